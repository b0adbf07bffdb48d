"""What the node holds in memory while its disk is slow (issue 10): background fetches wait for the
cache writer's room before they decompress, so frames and chunks held stay within
`cache_write_pending_bytes`; the holders' bytes are exported as `peerpull_memory_bytes{holder}`."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from peer.cache import ChunkCache
from peer.chunk import ChunkRef
from peer.fetcher import ChunkFetcher
from peer.metrics import PeerMetrics, parse_exposition
from tests.test_chunk_cache import make_chunk

FRAMES = 40
SIZE = 256 * 1024


class MemoryOrigin:
    """Frames by digest, answered at once (the origin is not what this test slows down)."""

    def __init__(self, frames: dict[str, bytes]) -> None:
        self._frames = frames

    async def fetch_frame(self, ref: ChunkRef, background: bool = False) -> bytes:
        return self._frames[ref.digest]


async def test_background_fetches_behind_a_slow_disk_hold_no_more_than_the_bound(tmp_path: Path) -> None:
    chunks = [make_chunk(seed, SIZE) for seed in range(FRAMES)]
    frame = max(len(f) for _, f in chunks)
    bound = 4 * frame
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    metrics = PeerMetrics()
    fetcher = ChunkFetcher(cache, MemoryOrigin({r.digest: f for r, f in chunks}), metrics, pending_store_bytes=bound)
    metrics.watch_memory({"cache_writer": lambda: fetcher.writer.held_bytes})
    release = threading.Event()
    fetcher._store_pool.submit(release.wait, 30)  # the disk is slow: nothing is written until released
    decompressed = 0
    verify = fetcher._decompress_verified

    def counting(ref: ChunkRef, data: bytes) -> bytes:
        nonlocal decompressed
        decompressed += 1
        return verify(ref, data)

    fetcher._decompress_verified = counting  # type: ignore[method-assign]
    try:
        tasks = [asyncio.create_task(fetcher.ensure(ref, background=True)) for ref, _ in chunks]
        peak = 0
        for _ in range(100):
            await asyncio.sleep(0.01)
            peak = max(peak, fetcher.writer.held_bytes)
        assert sum(t.done() for t in tasks) <= bound // frame  # the rest wait for room, holding no chunk
        # the frames let in fill the bound; no fetch decompressed a chunk it could not queue
        assert frame <= peak <= bound
        assert decompressed <= bound // frame
        exported = parse_exposition(metrics.render().decode())
        assert exported['peerpull_memory_bytes{holder="cache_writer"}'] == fetcher.writer.held_bytes
        release.set()
        assert await asyncio.gather(*tasks) == ["origin"] * FRAMES
        await fetcher.flush()
        assert fetcher.writer.held_bytes == 0 and decompressed == FRAMES
        assert all([await cache.contains(ref.digest) for ref, _ in chunks])
    finally:
        release.set()
        await fetcher.cancel_fetches()
        fetcher.close()
        cache.close()


def test_the_resident_size_is_exported() -> None:
    metrics = PeerMetrics()
    exported = parse_exposition(metrics.render().decode())
    assert exported["peerpull_resident_bytes"] > 1 << 20  # this Python process: several MiB at least
