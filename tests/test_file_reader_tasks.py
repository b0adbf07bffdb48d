"""FileReader's background work has an owner: concurrent pieces of one chunk share one load (the
fetcher's one flight per digest, cache tier included), and close() cancels and awaits fetch-ahead
and read-ahead tasks."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import cast

import pytest
import zstandard

from converter.format import toc as fmt
from peer.cache import ChunkCache
from peer.chunk import ChunkRef
from peer.fetcher import ChunkFetcher
from peer.metrics import PeerMetrics
from snapshotter.fs.file_reader import FileReader, LayerSource


class GatedFetcher:
    """Fault injection: fetches wait on a gate, so the test sees what is in flight."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gets: list[str] = []
        self.fetches: list[str] = []
        self.cancelled = 0

    async def get(self, ref: ChunkRef) -> bytes:
        self.gets.append(ref.digest)
        await self.gate.wait()
        return b"x" * ref.length

    def loading(self, digest: str) -> bool:
        return False

    def cached(self, digest: str) -> bool:
        return False

    async def fetch(self, ref: ChunkRef, use_peers: bool, background: bool = False) -> object:
        self.fetches.append(ref.digest)
        try:
            await asyncio.Event().wait()  # never ends: only close() stops it
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return None

    async def ensure(self, ref: ChunkRef, use_peers: bool = True, background: bool = True) -> str:
        await self.fetch(ref, use_peers, background)
        return ""


def _chunks(n: int, size: int = 1 << 20) -> list[fmt.Chunk]:
    return [fmt.Chunk(i * size, size, i * 1000, 1000, hashlib.sha256(bytes([i])).digest()) for i in range(n)]


def _source(chunks: list[fmt.Chunk]) -> LayerSource:
    toc = fmt.Toc(1 << 20, [fmt.TocEntry(path="f", type=fmt.FILE, mode=0o644, size=len(chunks) << 20, chunks=chunks)])
    return LayerSource.from_toc("example/repo", "sha256:" + "cd" * 32, toc)


class GatedOrigin:
    """Fault injection: the origin answers when the test opens the gate."""

    def __init__(self, frames: dict[str, bytes]) -> None:
        self.gate = asyncio.Event()
        self.calls = 0
        self.asked: set[str] = set()
        self._frames = frames

    async def fetch_frame(self, ref: ChunkRef, background: bool = False) -> bytes:
        self.calls += 1
        self.asked.add(ref.digest)
        await self.gate.wait()
        return self._frames[ref.digest]


async def test_pieces_of_one_chunk_share_one_load(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    frame = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(data)
    chunks = [fmt.Chunk(0, len(data), 0, len(frame), hashlib.sha256(data).digest())]
    source = _source(chunks)
    origin = GatedOrigin({source.ref(chunks[0]).digest: frame})
    metrics = PeerMetrics()
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    fetcher = ChunkFetcher(cache, origin, metrics)

    async def read_all_pieces(reader: FileReader) -> list[bytes]:
        return list(await asyncio.gather(*(reader.read(source, 1, chunks, len(data), off, 128 << 10)
                                           for off in range(0, len(data), 128 << 10))))

    try:
        reader = FileReader(fetcher, 64 << 20, "none", 4)
        reads = asyncio.ensure_future(read_all_pieces(reader))
        while not origin.calls:
            await asyncio.sleep(0)
        origin.gate.set()
        assert b"".join(await reads) == data and origin.calls == 1  # cold: one remote fetch
        await reader.close()
        await fetcher.flush()
        fresh = FileReader(fetcher, 64 << 20, "none", 4)  # an empty memory cache: the chunk is on disk
        assert b"".join(await read_all_pieces(fresh)) == data
        assert origin.calls == 1
        assert metrics.requests.labels("cache")._value.get() == 1  # warm: one disk read and decompression
        await fresh.close()
    finally:
        await fetcher.cancel_fetches()
        fetcher.close()
        cache.close()


async def test_close_cancels_and_awaits_background_fetches() -> None:
    fetcher = GatedFetcher()
    fetcher.gate.set()
    reader = FileReader(cast(ChunkFetcher, fetcher), 64 << 20, "file", 2)
    chunks = _chunks(6)
    source = _source(chunks)
    await reader.read(source, 1, chunks, 6 << 20, 0, 4096)  # schedules the rest of the file
    while not fetcher.fetches:
        await asyncio.sleep(0)
    await reader.close()
    assert fetcher.cancelled == len(fetcher.fetches) > 0
    assert len(reader._tasks) == 0
    reader.background(source, chunks, "after close")  # refused once closed: no orphan
    assert len(reader._tasks) == 0


@pytest.mark.parametrize("prefetch", ["file", "layer", "sequential"])
async def test_a_read_the_cache_answers_starts_nothing_over_the_network(tmp_path: Path, prefetch: str) -> None:
    """A second start reads what the first one cached: neither whole-file/layer prefetch nor
    read-ahead of chunks the node does not have starts from such a read (issue 10)."""
    datas = [bytes([i]) * (1 << 20) for i in range(6)]
    compress = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress
    frames = [compress(d) for d in datas]
    offsets = [sum(len(f) for f in frames[:i]) for i in range(6)]
    chunks = [fmt.Chunk(i << 20, 1 << 20, offsets[i], len(frames[i]), hashlib.sha256(d).digest())
              for i, d in enumerate(datas)]
    source = _source(chunks)
    origin = GatedOrigin({source.ref(c).digest: f for c, f in zip(chunks, frames)})
    origin.gate.set()
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    fetcher = ChunkFetcher(cache, origin, PeerMetrics())
    try:
        for c in chunks[:2]:  # the first start read the file's first 2 MiB
            await fetcher.get(source.ref(c))
        await fetcher.flush()
        assert origin.calls == 2
        reader = FileReader(fetcher, 64 << 20, prefetch, 4, sequential_bytes=1 << 20)
        for off in range(0, 2 << 20, 128 << 10):  # the second start reads the same, sequentially
            assert await reader.read(source, 1, chunks, 6 << 20, off, 128 << 10) == datas[off >> 20][:128 << 10]
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert origin.calls == 2
        await reader.read(source, 1, chunks, 6 << 20, 2 << 20, 4096)  # past what it has: fetched (and ahead)
        await reader.close()
        assert origin.calls >= 3
    finally:
        await fetcher.cancel_fetches()
        fetcher.close()
        cache.close()


async def test_a_cold_sequential_reader_still_prefetches_the_whole_file(tmp_path: Path) -> None:
    """Reads answered from memory that the read-ahead filled are part of a cold file: the whole-file
    prefetch still starts once the reader is past the threshold."""
    datas = [bytes([i]) * (1 << 20) for i in range(8)]
    compress = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress
    frames = [compress(d) for d in datas]
    offsets = [sum(len(f) for f in frames[:i]) for i in range(8)]
    chunks = [fmt.Chunk(i << 20, 1 << 20, offsets[i], len(frames[i]), hashlib.sha256(d).digest())
              for i, d in enumerate(datas)]
    source = _source(chunks)
    origin = GatedOrigin({source.ref(c).digest: f for c, f in zip(chunks, frames)})
    origin.gate.set()
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    fetcher = ChunkFetcher(cache, origin, PeerMetrics())
    try:
        reader = FileReader(fetcher, 64 << 20, "sequential", 4, sequential_bytes=2 << 20)
        for off in range(0, 3 << 20, 128 << 10):
            await reader.read(source, 1, chunks, 8 << 20, off, 128 << 10)
        for _ in range(500):
            if len(origin.asked) == len(chunks):
                break
            await asyncio.sleep(0.01)
        assert len(origin.asked) == len(chunks)  # read-ahead covers 5 of 8; the prefetch the rest
        await reader.close()
    finally:
        await fetcher.cancel_fetches()
        fetcher.close()
        cache.close()
