"""A stream never asks the registry for a frame a read is already fetching: the read's Range
request was sent from the origin's queue (which no longer lists it); the origin counts it as on
the wire, and the fetcher's flight covers it until the frame is verified and staged in the cache
(peer/stream.py `_taken`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from peer.config import PeerConfig
from peer.warm import image_chunks
from tests.support.fault_proxy import FaultProxy
from tests.support.waiting import async_wait_until
from tests.test_stream import RUN, Node, blob_ranges, image  # noqa: F401 — the converted image fixture


async def test_a_stream_leaves_out_the_frame_a_read_has_on_the_wire(registry_session, image: str,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    proxy = await FaultProxy(registry_session.url).start()
    proxied = image.replace(registry_session.address, proxy.address)
    async with RegistryClient(RegistryConfig(read_timeout_s=60)) as client:
        refs, _ = await image_chunks(client, proxied)
        node = Node(client, tmp_path, PeerConfig(coalesce_max_bytes=RUN, stream_parallel=2))
        read = None
        try:
            blob = max(refs, key=lambda r: r.compressed_length).blob
            frames = sorted((r for r in refs if r.blob == blob), key=lambda r: r.blob_offset)[:6]
            target = frames[2]
            before = len(proxy.requests)
            proxy.hold("/blobs/", times=1)  # the read's request stays on the wire
            read = asyncio.create_task(node.fetcher.get(target))
            await async_wait_until(lambda: proxy.held == 1, timeout_s=30, what="the read's request")
            assert node.fetcher.fetching(target.digest) and node.origin.busy(target)
            report = await node.streamer.stream(frames, "around the read")
            await node.fetcher.flush()
            ranges = blob_ranges(proxy, before)
            covering = [r for r in ranges if r[1] <= target.blob_offset < r[2]]
            assert len(covering) == 1  # the read's own, never the stream's
            assert report.from_origin == len(frames) - 1 and report.failed == 0
            assert all([await node.cache.contains(r.digest) for r in frames if r is not target])
        finally:
            if read is not None:
                read.cancel()
                await asyncio.gather(read, return_exceptions=True)
            await node.close()
            await proxy.stop()


async def test_a_read_waiting_for_a_stopped_streams_run_asks_on_its_own(registry_session, image: str,  # noqa: F811
                                                                        tmp_path: Path) -> None:
    proxy = await FaultProxy(registry_session.url).start()
    proxied = image.replace(registry_session.address, proxy.address)
    async with RegistryClient(RegistryConfig(read_timeout_s=60)) as client:
        refs, _ = await image_chunks(client, proxied)
        node = Node(client, tmp_path, PeerConfig(coalesce_max_bytes=RUN, stream_parallel=2))
        stream = None
        try:
            blob = max(refs, key=lambda r: r.compressed_length).blob
            frames = sorted((r for r in refs if r.blob == blob), key=lambda r: r.blob_offset)[:4]
            proxy.hold("/blobs/", times=1)  # the stream's run stays on the wire
            stream = asyncio.create_task(node.streamer.stream(frames, "stopped"))
            await async_wait_until(lambda: proxy.held == 1, timeout_s=30, what="the stream's request")
            read = asyncio.create_task(node.fetcher.get(frames[1]))  # waits for the run's answer
            await async_wait_until(lambda: node.fetcher.fetching(frames[1].digest), timeout_s=30, what="the read")
            stream.cancel()  # e.g. its image's layers released
            await asyncio.gather(stream, return_exceptions=True)
            data = await asyncio.wait_for(read, 30)  # not cancelled with the stream: its own request
            assert len(data) == frames[1].length
        finally:
            if stream is not None:
                stream.cancel()
                await asyncio.gather(stream, return_exceptions=True)
            await node.close()
            await proxy.stop()
