"""A stream's peer tier (peer/stream.py): frames a live peer holds come from that peer in batched
requests, not from the registry; a peer that fails falls back to the origin without losing a frame.

The peer is a real `peerpull peer` process; a recording proxy in front of it counts its requests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from converter.format.digest import sha256_digest
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from peer.cache import ChunkCache
from peer.chunk import ChunkRef
from peer.client import INFLIGHT_PER_PEER, MAX_BATCH, PeerClient
from peer.config import PeerConfig
from peer.fetcher import ChunkFetcher
from peer.membership import Membership
from peer.metrics import PeerMetrics
from peer.origin import OriginSource
from peer.stream import Streamer
from peer.warm import image_chunks
from tests.support.fault_proxy import FaultProxy
from tests.support.peer_cluster import TOKEN, NodeProcess, build_cluster_image, start_cluster
from tests.support.waiting import async_wait_until
from tests.test_convert import peerpull

CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def image(registry_session, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("stream-peers") / "layout"
    build_cluster_image(layout, big_bytes=3 << 20, small_files=120)
    target = f"{registry_session.address}/stream-peers/app:1"
    # format 1: a frame per small file, so there are many frames to batch
    peerpull("convert", "--quiet", "--format-version", "1", "--chunk-size", str(CHUNK), f"oci:{layout}:latest", target)
    return target


@pytest.fixture
def warm_peer(registry_session, image: str, tmp_path: Path) -> Iterator[NodeProcess]:
    """A peer node that holds every frame of `image`."""
    (peer,) = start_cluster(tmp_path / "nodes", 1,
                            extra_env={"PEERPULL_PEER_TRUSTED_REGISTRIES": registry_session.address})
    try:
        assert peer.warm(image)["chunks"] > 0
        yield peer
    finally:
        peer.stop()


class Local:
    """This node: cache, origin, fetcher and streamer, with the peer (through a proxy) as its only member."""

    def __init__(self, client: RegistryClient, session: aiohttp.ClientSession, tmp_path: Path, peer_address: str) -> None:
        config = PeerConfig()
        self.cache = ChunkCache(str(tmp_path / "local-cache"), 1 << 30)
        self.origin = OriginSource(client, config)
        self.membership = Membership("local", PeerClient(session, TOKEN, 10.0), 0.3, 30.0)
        self.membership.set_candidates({peer_address})
        self.fetcher = ChunkFetcher(self.cache, self.origin, PeerMetrics(), self.membership,
                                    PeerClient(session, TOKEN, 10.0))
        self.streamer = Streamer(self.fetcher, self.origin, self.cache, config, self.membership)

    async def close(self) -> None:
        await self.fetcher.cancel_fetches()
        await self.origin.close()
        self.fetcher.close()
        self.cache.close()


@pytest.fixture
async def proxied_peer(warm_peer: NodeProcess) -> AsyncIterator[FaultProxy]:
    proxy = await FaultProxy(f"http://{warm_peer.address}").start()
    yield proxy
    await proxy.stop()


async def knows_holdings(local: Local, refs: list[ChunkRef]) -> None:
    """Health check, then the peer's summary: every frame has the peer as a holder."""
    await local.membership.check_once()
    await async_wait_until(lambda: all(m.holds is not None and m.holds.might_hold(r.digest)
                                       for r in refs for m in local.membership.candidates_for(r.digest))
                           and all(local.membership.candidates_for(r.digest) for r in refs),
                           10, "the peer's summary")


async def stored(cache: ChunkCache, refs: list[ChunkRef]) -> bool:
    """Every frame in the local cache, with the content its digest names."""
    for ref in refs:
        loaded = await cache.load(ref)
        if loaded is None or sha256_digest(loaded[1]) != ref.digest:
            return False
    return True


async def test_frames_a_live_peer_holds_come_from_it_in_batches(registry_session, image: str, tmp_path: Path,
                                                                proxied_peer: FaultProxy) -> None:
    async with RegistryClient(RegistryConfig()) as client, aiohttp.ClientSession() as session:
        refs, _ = await image_chunks(client, image)
        local = Local(client, session, tmp_path, proxied_peer.address)
        try:
            await knows_holdings(local, refs)
            before = len(proxied_peer.requests)
            report = await local.streamer.stream(refs, "test")
            await local.fetcher.flush()
            posts = [r for r in proxied_peer.requests[before:] if r[0] == "POST" and r[1] == "/v1/chunks"]
            assert report.frames == len(refs) and report.from_peers == len(refs)
            assert report.from_origin == report.failed == 0 and local.origin.requests == 0
            # batched: the first requests may go alone while the peer's slots are free, the rest together
            assert 0 < len(posts) <= INFLIGHT_PER_PEER + -(-len(refs) // MAX_BATCH) < len(refs)
            assert await stored(local.cache, refs)
        finally:
            await local.close()


async def test_a_peer_that_fails_mid_stream_leaves_its_frames_to_the_origin(registry_session, image: str,
                                                                          tmp_path: Path,
                                                                          proxied_peer: FaultProxy) -> None:
    async with RegistryClient(RegistryConfig()) as client, aiohttp.ClientSession() as session:
        refs, _ = await image_chunks(client, image)
        local = Local(client, session, tmp_path, proxied_peer.address)
        try:
            await knows_holdings(local, refs)
            proxied_peer.fail("/v1/chunks", status=503, times=1000)  # the peer breaks after the health check
            report = await local.streamer.stream(refs, "test")
            await local.fetcher.flush()
            assert report.frames == len(refs) and report.failed == 0
            assert report.from_peers == 0 and report.from_origin == len(refs)
            assert local.origin.requests > 0
            assert await stored(local.cache, refs)
        finally:
            await local.close()
