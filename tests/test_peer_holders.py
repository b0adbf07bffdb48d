"""A warm peer pays off: two real PeerNodes on loopback and a real registry. A node asks the peer
that holds a chunk before the origin, even for chunks it owns on the ring; a cold pair still asks
the origin about once per chunk; a corrupt frame a peer serves is caught by the receiver; the
holdings summary a peer sends is bounded and validated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from converter.registry.config import RegistryConfig
from peer.chunk import ChunkRef
from peer.client import PROTOCOL_VERSION, PeerClient
from peer.config import PeerConfig
from peer.membership import Membership
from peer.node import PeerNode
from peer.ring import owners
from peer.summary import FILTER_BYTES
from peer.warm import image_chunks
from peerpull.testbed.registry import free_port
from tests.support.aio_site import serve_local
from tests.support.peer_cluster import build_cluster_image
from tests.support.waiting import async_wait_until
from tests.test_chunk_cache import flip, stored_file
from tests.test_convert import peerpull


@pytest.fixture(scope="module")
def image(registry_session, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("holders") / "layout"
    build_cluster_image(layout, big_bytes=2 << 20, small_files=30)
    target = f"{registry_session.address}/holders/app:1"
    peerpull("convert", "--quiet", "--chunk-size", str(64 * 1024), f"oci:{layout}:latest", target)
    return target


def origin_chunks(node: PeerNode) -> float:
    return float(node.metrics.requests.labels("origin")._value.get())


def peer_chunks(node: PeerNode) -> float:
    return float(node.metrics.requests.labels("peer")._value.get())


@asynccontextmanager
async def running(root: Path, name: str, port: int, peers: list[int]) -> AsyncIterator[PeerNode]:
    config = PeerConfig(node_id=name, cache_dir=str(root / name), listen_host="127.0.0.1", listen_port=port,
                        discovery="static", static_peers=tuple(f"127.0.0.1:{p}" for p in peers),
                        health_interval_s=0.1, trusted_registries=("*",))
    node = PeerNode(config, RegistryConfig())
    ready = asyncio.Event()
    task = asyncio.create_task(node.run(ready))
    await asyncio.wait_for(ready.wait(), 30)
    try:
        yield node
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def sees_holdings_of(node: PeerNode, other: PeerNode) -> bool:
    assert node.membership is not None and other.fetcher is not None
    await other.fetcher.flush()
    generation = other.fetcher._cache.holdings.generation
    return any(m.node_id == other.node_id and m.generation == generation for m in node.membership.alive())


async def test_a_node_whose_peer_warmed_the_image_asks_the_registry_for_nothing(image: str, tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    async with running(tmp_path, "a", port_a, [port_b]) as a:
        first = await a.warm_image(image)  # alone: every chunk from the origin
        chunks = int(first["chunks"])  # type: ignore[call-overload]
        assert origin_chunks(a) == chunks
        async with running(tmp_path, "b", port_b, [port_a]) as b:
            await async_wait_until(lambda: sees_holdings_of(b, a), 30, "b to know what a holds")
            report = await b.warm_image(image)
            # about half of these chunks b owns on the ring: it still asks a, which holds them
            assert origin_chunks(b) == 0 and origin_chunks(a) == chunks
            assert report["tiers"] == {"peer": chunks}
            second = await b.warm_image(image)  # and now b has them itself, without reading them again
            assert second["tiers"] == {"cache": chunks}


async def test_a_cold_pair_asks_the_origin_about_once_per_chunk(image: str, tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    async with running(tmp_path, "a", port_a, [port_b]) as a, running(tmp_path, "b", port_b, [port_a]) as b:
        await async_wait_until(lambda: bool(a.membership and a.membership.alive()), 30, "a to see b")
        report = await a.warm_image(image)
        chunks = int(report["chunks"])  # type: ignore[call-overload]
        assert origin_chunks(a) + origin_chunks(b) == chunks  # each chunk once, cluster-wide
        assert 0 < peer_chunks(a) < chunks  # what b owns came through b: no extra round trip for the rest


async def test_a_corrupt_frame_a_peer_serves_is_caught_by_the_receiver(image: str, tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    async with running(tmp_path, "a", port_a, [port_b]) as a:
        await a.warm_image(image)
        assert a.fetcher is not None
        cache = a.fetcher._cache
        ref = next(r for r in await _refs(a, image) if r.compressed_length > 40_000)  # stored as a file
        flip(stored_file(cache, ref), ref.compressed_length // 2)  # a sends it as stored, unchecked
        async with running(tmp_path, "b", port_b, [port_a]) as b:
            await async_wait_until(lambda: sees_holdings_of(b, a), 30, "b to know what a holds")
            assert b.fetcher is not None
            data = await b.fetcher.get(ref)  # b verifies, drops a's frame, and goes to the origin
            assert b.metrics.errors.labels("peer", "bad_bytes")._value.get() == 1
            assert origin_chunks(b) == 1 and len(data) == ref.length


async def _refs(node: PeerNode, image: str) -> list[ChunkRef]:
    assert node.registry is not None
    return (await image_chunks(node.registry, image))[0]


@pytest.mark.parametrize("size", [FILTER_BYTES - 1, 8 * FILTER_BYTES])
async def test_a_summary_of_the_wrong_size_is_ignored(image: str, tmp_path: Path, size: int) -> None:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"node_id": "liar", "protocol": PROTOCOL_VERSION, "summary": 7})

    async def summary(request: web.Request) -> web.Response:
        return web.Response(body=b"\xff" * size)  # "I hold everything", in a malformed filter

    app = web.Application()
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/summary", summary)
    runner, address = await serve_local(app)
    try:
        async with running(tmp_path, "a", free_port(), [int(address.rsplit(":", 1)[1])]) as a:
            assert a.membership is not None
            await async_wait_until(lambda: bool(a.membership and a.membership.alive()
                                                and a.membership.alive()[0].generation == 7), 30, "the liar's summary")
            (liar,) = a.membership.alive()
            assert liar.holds is None
            for r in await _refs(a, image):  # asked by the ring alone: only for the chunks it owns
                assert (a.membership.candidates_for(r.digest) == [liar]) == (owners(r.digest, ["a", "liar"]) == ["liar"])
    finally:
        await runner.cleanup()


async def test_a_member_with_slow_health_answers_stays_alive_between_answers() -> None:
    async def slow_health(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)  # a busy peer: each answer takes several health intervals
        return web.json_response({"node_id": "busy", "protocol": PROTOCOL_VERSION})

    app = web.Application()
    app.router.add_get("/v1/health", slow_health)
    runner, address = await serve_local(app)
    async with aiohttp.ClientSession() as session:
        membership = Membership("me", PeerClient(session, "", 5.0), health_interval_s=0.05, failure_skip_s=1)
        membership.set_candidates({address})
        task = asyncio.create_task(membership.run())
        try:
            await async_wait_until(lambda: bool(membership.alive()), 30, "the busy peer to join")
            seen_dead = False

            def rounds_done(until: int) -> bool:
                nonlocal seen_dead
                seen_dead |= not membership.alive()
                return membership._round >= until

            target = membership._round + 4
            await async_wait_until(lambda: rounds_done(target), 30, "four more health rounds")
            assert not seen_dead  # never "gone" while it answers every check, however slowly
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()
