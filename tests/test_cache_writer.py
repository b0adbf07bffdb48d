"""Verified frames reach the disk cache in batches (peer/cache_writer.py): every frame lands and is
readable, one frame that cannot be stored loses none of the others, and the writer's backlog stays
within its bound."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from converter.format.digest import sha256_digest
from peer.cache import ChunkCache
from peer.cache_writer import CacheWriter
from peer.metrics import PeerMetrics
from tests.test_chunk_cache import make_chunk

FRAME = 64 * 1024  # make_chunk's random data does not compress: frames are a little larger


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-store")
    yield executor
    executor.shutdown(wait=True)


def hold(pool: ThreadPoolExecutor) -> threading.Event:
    """Keep the store thread busy until the returned event is set (the disk is slow)."""
    release = threading.Event()
    pool.submit(release.wait, 30)
    return release


async def test_frames_queued_together_are_stored_in_one_batch_and_readable_from_disk(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    writer = CacheWriter(cache, pool, PeerMetrics(), 64 << 20, 16 << 20)
    chunks = [make_chunk(seed, FRAME) for seed in range(40)]
    release = hold(pool)
    for ref, frame in chunks:
        await writer.put(ref, frame)
    for ref, frame in chunks:  # staged: served before they are on disk
        assert await cache.contains(ref.digest) and await cache.load_frame(ref) == frame
    release.set()
    await writer.flush()
    assert writer.batches == 1 and writer.failed == 0 and writer.pending_bytes == 0
    cache.close()
    reopened = ChunkCache(str(tmp_path / "c"), 1 << 30)  # from the disk, nothing staged
    for ref, _ in chunks:
        loaded = await reopened.load(ref)
        assert loaded is not None and sha256_digest(loaded[1]) == ref.digest
    reopened.close()


async def test_a_batch_is_cut_at_its_byte_limit(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    chunks = [make_chunk(seed, FRAME) for seed in range(10)]
    frame_bytes = len(chunks[0][1])
    writer = CacheWriter(cache, pool, PeerMetrics(), 64 << 20, 3 * frame_bytes)
    release = hold(pool)
    for ref, frame in chunks:
        await writer.put(ref, frame)
    release.set()
    await writer.flush()
    assert writer.batches == 4  # 3 + 3 + 3 + 1
    assert all([await cache.load(ref) is not None for ref, _ in chunks])
    cache.close()


async def test_a_frame_that_cannot_be_stored_loses_none_of_the_others(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    metrics = PeerMetrics()
    writer = CacheWriter(cache, pool, metrics, 64 << 20, 16 << 20)
    chunks = [make_chunk(seed, FRAME) for seed in range(12)]
    bad = chunks[5][0]
    real_set = cache._cache.set

    def failing_set(key: str, value: bytes, *args: object, **kwargs: object) -> bool:
        if key == bad.digest:  # the fault: this one frame cannot be written (a full disk, say)
            raise OSError(28, "No space left on device")
        return real_set(key, value, *args, **kwargs)  # type: ignore[arg-type]

    cache._cache.set = failing_set  # type: ignore[method-assign]
    release = hold(pool)
    for ref, frame in chunks:
        await writer.put(ref, frame)
    release.set()
    await writer.flush()
    assert writer.failed == 1
    assert metrics.errors.labels("cache", "OSError")._value.get() == 1
    assert not await cache.contains(bad.digest)  # no longer staged: a later read fetches it again
    cache.close()
    reopened = ChunkCache(str(tmp_path / "c"), 1 << 30)
    for ref, _ in chunks:
        assert (await reopened.load(ref) is None) == (ref is bad)
    reopened.close()


async def test_background_puts_wait_while_the_backlog_is_full_and_readers_never_do(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 1 << 30)
    chunks = [make_chunk(seed, FRAME) for seed in range(20)]
    frame_bytes = len(chunks[0][1])
    bound = 4 * frame_bytes
    writer = CacheWriter(cache, pool, PeerMetrics(), bound, 16 << 20)
    release = hold(pool)
    returned: list[int] = []

    async def background(i: int) -> None:
        await writer.put(*chunks[i])
        returned.append(i)

    tasks = [asyncio.create_task(background(i)) for i in range(16)]
    for _ in range(20):
        await asyncio.sleep(0)
    # what the writer accepted from background callers is within its bound; the rest are held
    assert len(returned) * frame_bytes <= bound and len(returned) < 16
    reader_ref, reader_frame = chunks[19]
    await asyncio.wait_for(writer.put(reader_ref, reader_frame, wait=False), 5)  # an on-demand read: not held
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    await writer.flush()
    assert sorted(returned) == list(range(16)) and writer.failed == 0 and writer.pending_bytes == 0
    assert all([await cache.load(ref) is not None for ref, _ in chunks[:16]])
    assert await cache.load(reader_ref) is not None
    cache.close()
