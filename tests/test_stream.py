"""Streams (peer/stream.py) against a real registry: every frame once, in coalesced Range requests,
and on-demand reads go first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from peer.cache import ChunkCache
from peer.chunk import ChunkRef
from peer.config import PeerConfig
from peer.fetcher import ChunkFetcher
from peer.metrics import PeerMetrics
from peer.origin import OriginSource
from peer.stream import Streamer, plan
from peer.warm import image_chunks
from tests.support.fault_proxy import FaultProxy
from tests.support.peer_cluster import build_cluster_image
from tests.support.waiting import async_wait_until
from tests.test_convert import peerpull

CHUNK = 64 * 1024
RUN = 512 << 10


@pytest.fixture(scope="module")
def image(registry_session, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("stream") / "layout"
    build_cluster_image(layout, big_bytes=3 << 20, small_files=40)
    target = f"{registry_session.address}/stream/app:1"
    peerpull("convert", "--quiet", "--chunk-size", str(CHUNK), f"oci:{layout}:latest", target)
    return target


def blob_ranges(proxy: FaultProxy, since: int = 0) -> list[tuple[str, int, int]]:
    """(blob, start, end exclusive) of every Range request the proxy saw after `since`."""
    out = []
    for method, path, header in proxy.requests[since:]:
        if method == "GET" and "/blobs/" in path and header.startswith("bytes="):
            lo, hi = header.removeprefix("bytes=").split("-")
            out.append((path.rsplit("/", 1)[1], int(lo), int(hi) + 1))
    return out


class Node:
    def __init__(self, client: RegistryClient, tmp_path: Path, config: PeerConfig) -> None:
        self.cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
        self.origin = OriginSource(client, config)
        self.fetcher = ChunkFetcher(self.cache, self.origin, PeerMetrics())
        self.streamer = Streamer(self.fetcher, self.origin, self.cache, config)

    async def close(self) -> None:
        await self.fetcher.cancel_fetches()
        await self.fetcher.flush()
        await self.origin.close()
        self.fetcher.close()
        self.cache.close()


async def test_a_stream_fetches_every_frame_once_in_coalesced_ranges(registry_session, image: str, tmp_path: Path) -> None:
    proxy = await FaultProxy(registry_session.url).start()
    proxied = image.replace(registry_session.address, proxy.address)
    async with RegistryClient(RegistryConfig()) as client:
        refs, _ = await image_chunks(client, proxied)
        node = Node(client, tmp_path, PeerConfig(coalesce_max_bytes=RUN, stream_parallel=3))
        try:
            before = len(proxy.requests)
            report = await node.streamer.stream(refs, "test")
            await node.fetcher.flush()
            ranges = blob_ranges(proxy, before)
            assert report.frames == len(refs) and report.from_origin == len(refs) and report.failed == 0
            assert report.requests == len(ranges) == node.origin.requests
            # every frame's bytes asked for exactly once, in runs no longer than the budget
            for ref in refs:
                covering = [r for r in ranges if r[0] == ref.blob and r[1] <= ref.blob_offset
                            and ref.blob_offset + ref.compressed_length <= r[2]]
                assert len(covering) == 1, ref
            by_blob: dict[str, list[tuple[int, int]]] = {}
            for blob, lo, hi in ranges:
                assert hi - lo <= RUN
                by_blob.setdefault(blob, []).append((lo, hi))
            for spans in by_blob.values():
                spans.sort()
                assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no byte twice
            total = sum(r.compressed_length for r in refs)
            assert len(ranges) <= total // RUN + 2 * len(by_blob)  # coalesced, not one per frame
            assert len(ranges) < len(refs) // 4
            assert all(await asyncio.gather(*(node.cache.contains(r.digest) for r in refs)))
            assert node.streamer.bytes_in_flight == 0
            # a second stream of the same frames finds them cached: nothing sent
            again = await node.streamer.stream(refs, "again")
            assert again.cached == len(refs) and again.requests == 0 and len(blob_ranges(proxy, before)) == len(ranges)
        finally:
            await node.close()
            await proxy.stop()


def test_plan_keeps_the_order_asked_for_and_never_reads_across_a_frame_not_asked_for() -> None:
    blob = "sha256:" + "b" * 64

    def ref(i: int) -> ChunkRef:  # frames of 100 bytes back to back
        return ChunkRef(f"sha256:{i:064x}", 1000, "r.example/x", blob, i * 100, 100, (i + 1) * 100)

    asked = [ref(7), ref(8), ref(1), ref(2), ref(3), ref(5)]  # 4 and 6 are cached or not wanted
    items = plan(asked, set(), budget=250)
    assert [[r.blob_offset // 100 for r in item.refs] for item in items] == [[7, 8], [1, 2], [3], [5]]
    assert all(item.origin for item in items)


async def test_an_on_demand_read_goes_before_the_streams_queued_requests(registry_session, image: str, tmp_path: Path) -> None:
    proxy = await FaultProxy(registry_session.url).start()
    proxied = image.replace(registry_session.address, proxy.address)
    # 3 slots, 2 reserved for on-demand reads: the stream has one request on the wire at a time
    config = PeerConfig(coalesce_max_bytes=RUN, stream_parallel=4, origin_max_inflight=3)
    async with RegistryClient(RegistryConfig(read_timeout_s=60)) as client:
        refs, _ = await image_chunks(client, proxied)
        node = Node(client, tmp_path, config)
        stream = None
        try:
            before = len(proxy.requests)
            proxy.hold("/blobs/", times=1)  # the stream's first run stays on the wire
            big = [r for r in refs if r.blob == max(refs, key=lambda r: r.compressed_length).blob]
            stream = asyncio.create_task(node.streamer.stream(big, "big"))
            await async_wait_until(lambda: proxy.held == 1, timeout_s=30, what="the stream's first request")
            target = big[-1]  # planned last: far behind the stream's queue
            data = await node.fetcher.get(target)
            assert len(data) == target.length
            ranges = blob_ranges(proxy, before)
            # on the wire: the stream's one request, then the read's own; none of the stream's
            # other runs went before the read
            assert len(ranges) == 2
            assert ranges[1][1] <= target.blob_offset < ranges[1][2]
            assert not stream.done() and node.origin._slots(target).in_use == (1, 1)
        finally:
            if stream is not None:
                stream.cancel()
                await asyncio.gather(stream, return_exceptions=True)
            assert node.streamer.bytes_in_flight == 0
            await node.close()
            await proxy.stop()


async def test_a_stream_never_holds_more_than_its_byte_budget(registry_session, image: str, tmp_path: Path) -> None:
    budget = 1 << 20
    config = PeerConfig(coalesce_max_bytes=256 << 10, stream_parallel=8, stream_max_bytes_in_flight=budget)
    async with RegistryClient(RegistryConfig()) as client:
        refs, _ = await image_chunks(client, image)
        node = Node(client, tmp_path, config)
        seen: list[int] = []

        async def sample() -> None:
            while True:
                seen.append(node.streamer.bytes_in_flight)
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        try:
            report = await node.streamer.stream(refs, "test")
            assert report.from_origin == len(refs) and report.failed == 0
            # the image (over 3 MiB) went through a 1 MiB budget, by the streamer's own accounting
            assert sum(r.compressed_length for r in refs) > 3 * budget
            assert 0 < max(seen) <= budget and node.streamer.bytes_in_flight == 0
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            await node.close()


async def test_a_stream_cancelled_before_its_verify_step_runs_releases_budget_and_staging(
        registry_session, image: str, tmp_path: Path) -> None:
    # the stream is cancelled in the very step that hands a fetched run to verification: the verify
    # task is then cancelled before it ever runs, so only the task's completion can give back its bytes
    config = PeerConfig(coalesce_max_bytes=RUN, stream_parallel=1)
    async with RegistryClient(RegistryConfig()) as client:
        refs, _ = await image_chunks(client, image)
        node = Node(client, tmp_path, config)
        real_fetch_run = node.origin.fetch_run
        streaming: list[asyncio.Task[object]] = []

        async def fetch_then_cancel(run: list[ChunkRef], background: bool = False) -> list[bytes]:
            frames = await real_fetch_run(run, background=background)
            streaming[0].cancel()  # lands before the verify task created next gets its first step
            return frames

        node.origin.fetch_run = fetch_then_cancel  # type: ignore[method-assign]
        try:
            task: asyncio.Task[object] = asyncio.create_task(node.streamer.stream(refs, "test"))
            streaming.append(task)
            with pytest.raises(asyncio.CancelledError):
                await task
            assert node.streamer.bytes_in_flight == 0
            assert node.origin.staged_bytes == 0
        finally:
            await node.close()
