"""FileReader's background work has an owner: concurrent pieces of one chunk share one load (the
one SingleFlight), and close() cancels and awaits fetch-ahead and read-ahead tasks."""

from __future__ import annotations

import asyncio
import hashlib
from typing import cast

from converter.format import toc as fmt
from peer.chunk import ChunkRef
from peer.fetcher import ChunkFetcher
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


async def test_pieces_of_one_chunk_share_one_load() -> None:
    fetcher = GatedFetcher()
    reader = FileReader(cast(ChunkFetcher, fetcher), 64 << 20, "none", 4)
    chunks = _chunks(1)
    source = _source(chunks)
    reads = [asyncio.ensure_future(reader.read(source, 1, chunks, 1 << 20, off, 128 << 10))
             for off in range(0, 1 << 20, 128 << 10)]
    while not fetcher.gets:
        await asyncio.sleep(0)
    fetcher.gate.set()
    assert [len(r) for r in await asyncio.gather(*reads)] == [128 << 10] * 8
    assert len(fetcher.gets) == 1
    await reader.close()


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
