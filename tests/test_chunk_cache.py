"""The node's chunk cache and the single-flight fetch."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import zstandard

from converter.format.digest import sha256_digest
from peer.cache import ChunkCache
from peer.chunk import ChunkRef
from peer.fetcher import ChunkFetcher
from peer.metrics import PeerMetrics
from peer.singleflight import SingleFlight
from tests.support.waiting import async_wait_until


def make_chunk(seed: int, size: int = 256 * 1024) -> tuple[ChunkRef, bytes]:
    data = random.Random(seed).randbytes(size)
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(data)
    ref = ChunkRef(sha256_digest(data), len(data), "127.0.0.1:1/x", "sha256:" + "0" * 64, 0, len(frame))
    return ref, frame


def stored_file(cache: ChunkCache, ref: ChunkRef) -> Path:
    """The file diskcache keeps `ref`'s frame in (frames are larger than its inline limit)."""
    (name,), = cache._cache._sql("SELECT filename FROM Cache WHERE key = ?", (ref.digest,)).fetchall()
    return Path(cache.directory) / name


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


async def test_entries_survive_a_restart_and_a_flipped_byte_is_a_miss(tmp_path: Path) -> None:
    ref, frame = make_chunk(1)
    cache = ChunkCache(str(tmp_path / "c"), 64 << 20)
    await cache.put_verified(ref, frame)
    cache.close()
    reopened = ChunkCache(str(tmp_path / "c"), 64 << 20)
    loaded = await reopened.load(ref)
    assert loaded is not None and sha256_digest(loaded[1]) == ref.digest
    for at in (len(frame) // 2, len(frame) - 2):  # in the data, then in zstd's checksum itself
        await reopened.put_verified(ref, frame)
        flip(stored_file(reopened, ref), at)
        assert await reopened.load(ref) is None  # caught by zstd's checksum, without a sha256
        assert not await reopened.contains(ref.digest)  # and the bad entry is gone
    reopened.close()


async def test_a_stored_frame_without_zstd_checksum_is_checked_by_sha256(tmp_path: Path) -> None:
    ref, _ = make_chunk(1)
    other = random.Random(2).randbytes(ref.length)  # same size, other content, no checksum flag
    cache = ChunkCache(str(tmp_path / "c"), 64 << 20)
    await cache.put_verified(ref, zstandard.ZstdCompressor(write_checksum=False).compress(other))
    assert await cache.load(ref) is None and not await cache.contains(ref.digest)
    cache.close()


async def test_cache_hits_write_nothing_to_sqlite(tmp_path: Path) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 64 << 20)
    chunks = [make_chunk(seed) for seed in range(8)]
    for ref, frame in chunks:
        await cache.put_verified(ref, frame)
    watcher = sqlite3.connect(tmp_path / "c" / "cache.db")  # data_version moves when another connection commits
    before = watcher.execute("PRAGMA data_version").fetchone()
    for _ in range(5):
        for ref, frame in chunks:
            assert (await cache.load(ref)) is not None and await cache.load_frame(ref) == frame
    assert watcher.execute("PRAGMA data_version").fetchone() == before
    await cache.put_verified(*make_chunk(99))  # the next store writes (and refreshes the hot entries)
    assert watcher.execute("PRAGMA data_version").fetchone() != before
    watcher.close()
    cache.close()


async def test_the_size_limit_holds_and_recent_entries_stay(tmp_path: Path) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 4 << 20)
    refs = []
    for seed in range(40):  # 40 × 256 KiB of incompressible frames = 10 MiB into a 4 MiB cache
        ref, frame = make_chunk(seed)
        await cache.put_verified(ref, frame)
        refs.append(ref)
        await cache.load(refs[0])  # keep the first one hot
    assert cache.volume() <= 5 << 20
    assert await cache.load(refs[0]) is not None
    assert await cache.load(refs[-1]) is not None
    assert sum([await cache.contains(r.digest) for r in refs]) < 20
    cache.close()


async def test_concurrent_misses_share_one_fetch(tmp_path: Path) -> None:
    ref, frame = make_chunk(3)

    release = asyncio.Event()

    class SlowOrigin:
        calls = 0

        async def fetch_frame(self, r: ChunkRef, background: bool = False) -> bytes:
            SlowOrigin.calls += 1
            await release.wait()  # until every reader waits for this one fetch
            return frame

    cache = ChunkCache(str(tmp_path / "c"), 64 << 20)
    fetcher = ChunkFetcher(cache, SlowOrigin(), PeerMetrics())
    readers = asyncio.gather(*(fetcher.get(ref) for _ in range(50)))
    await async_wait_until(lambda: fetcher._flights.waiters(ref.digest) == 50, 30, "50 readers on one fetch")
    release.set()
    results = await readers
    assert SlowOrigin.calls == 1
    assert all(sha256_digest(r) == ref.digest for r in results)
    assert (await fetcher.fetch(ref, use_peers=True)).tier == "cache"
    cache.close()


async def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    flights: SingleFlight[int] = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()

    async def work() -> int:
        started.set()
        await release.wait()
        return 42

    first = asyncio.ensure_future(flights.do("k", work))
    await started.wait()
    second = asyncio.ensure_future(flights.do("k", work))
    await async_wait_until(lambda: flights.waiters("k") == 2, 10, "two waiters")
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    release.set()
    assert await second == 42
    assert not flights.inflight("k")


async def test_the_index_answers_misses_without_the_disk_and_staged_frames_are_served(tmp_path: Path) -> None:
    ref, frame = make_chunk(5)
    cache = ChunkCache(str(tmp_path / "c"), 64 << 20)
    await cache.put_verified(ref, frame)
    cache.close()
    reopened = ChunkCache(str(tmp_path / "c"), 64 << 20)
    reopened.start_index()  # its owner (PeerNode.run) starts the index
    await async_wait_until(lambda: reopened._indexed, 30, "the start-up index")  # built in the background
    assert reopened.might_have(ref.digest)  # found by the start-up index
    absent, absent_frame = make_chunk(6)
    assert not reopened.might_have(absent.digest) and await reopened.load(absent) is None
    reopened.stage(absent, absent_frame)  # verified, its disk write still queued
    loaded = await reopened.load(absent)
    assert loaded is not None and sha256_digest(loaded[1]) == absent.digest
    reopened.store_verified(absent, absent_frame)
    assert reopened.might_have(absent.digest) and not reopened._staged
    reopened.close()


async def test_hot_entries_outlive_colder_ones_under_eviction(tmp_path: Path) -> None:
    cache = ChunkCache(str(tmp_path / "c"), 4 << 20)
    hot = [make_chunk(seed) for seed in range(4)]
    for ref, frame in hot:
        await cache.put_verified(ref, frame)
    for seed in range(100, 140):  # 10 MiB of newer entries through a 4 MiB cache, the old ones read meanwhile
        await cache.put_verified(*make_chunk(seed))
        for ref, _ in hot:
            assert await cache.load_frame(ref) is not None
    assert cache.volume() <= 5 << 20
    cache.close()


async def test_serving_and_warming_a_cached_chunk_neither_decompresses_nor_hashes(tmp_path: Path) -> None:
    ref, frame = make_chunk(7)

    class NoOrigin:
        async def fetch_frame(self, r: ChunkRef, background: bool = False) -> bytes:
            raise AssertionError("the cached chunk went to the origin")

    cache = ChunkCache(str(tmp_path / "c"), 64 << 20)
    await cache.put_verified(ref, frame)
    flip(stored_file(cache, ref), len(frame) // 2)  # a bad frame is sent as it is: the receiver checks
    fetcher = ChunkFetcher(cache, NoOrigin(), PeerMetrics())
    assert await fetcher.fetch_frame(ref, use_peers=False) != (frame, "cache")
    assert (await fetcher.fetch_frame(ref, use_peers=False))[1] == "cache"
    assert await fetcher.ensure(ref) == "cache"
    fetcher.close()
    cache.close()


async def test_a_fetched_chunk_is_verified_once_and_found_by_the_next_read(tmp_path: Path) -> None:
    ref, frame = make_chunk(8)

    class Origin:
        calls = 0

        async def fetch_frame(self, r: ChunkRef, background: bool = False) -> bytes:
            Origin.calls += 1
            return frame

    cache = ChunkCache(str(tmp_path / "c"), 64 << 20)
    fetcher = ChunkFetcher(cache, Origin(), PeerMetrics())
    assert await fetcher.ensure(ref, background=True) == "origin"  # a prefetch: verified, staged, stored
    assert (await fetcher.fetch(ref, use_peers=True)).tier == "cache"
    await fetcher.flush()
    assert Origin.calls == 1 and await cache.contains(ref.digest)
    bad = ChunkRef(sha256_digest(b"other"), ref.length, ref.repository, ref.blob, 0, len(frame))
    try:
        await fetcher.ensure(bad)  # what enters the node is checked against its sha256
    except Exception as exc:
        assert type(exc).__name__ == "DigestMismatchError"
    else:
        raise AssertionError("a frame that does not hash to its digest was accepted")
    assert not await cache.contains(bad.digest)
    fetcher.close()
    cache.close()


async def test_background_verification_and_disk_writes_run_at_a_lower_cpu_priority(tmp_path: Path) -> None:
    import os
    import threading

    from peer.fetcher import BACKGROUND_NICE

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    cache = ChunkCache(str(tmp_path / "c"), 64 << 20)
    fetcher = ChunkFetcher(cache, None, PeerMetrics())  # type: ignore[arg-type]  # no fetch: threads only
    loop = asyncio.get_running_loop()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        for pool in (fetcher._background_pool, fetcher._store_pool):
            assert await loop.run_in_executor(pool, own_nice) == min(19, base + BACKGROUND_NICE)
        assert await loop.run_in_executor(None, own_nice) == base  # on-demand reads verify at full priority
    finally:
        fetcher.close()
        cache.close()
