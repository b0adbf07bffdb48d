"""Faults on every tier: reads still complete with correct bytes, and the fault shows in metrics."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import aiohttp
import msgpack
import pytest
from aiohttp import web

from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from peer.cache import ChunkCache
from peer.chunk import ChunkRef
from peer.client import PROTOCOL_HEADER, PROTOCOL_VERSION, PeerClient, PeerFetchError
from peer.config import PeerConfig
from peer.fetcher import ChunkFetcher
from peer.membership import Membership
from peer.metrics import PeerMetrics, parse_exposition
from peer.origin import OriginSource
from peer.ring import owners
from peer.warm import image_chunks
from peerpull.testbed.registry import free_port
from tests.support.aio_site import serve_local
from tests.support.fault_proxy import FaultProxy
from tests.support.hostile_server import HostileServer
from tests.support.peer_cluster import build_cluster_image
from tests.test_convert import peerpull

CHUNK = 64 * 1024


@pytest.fixture
def image(registry, tmp_path: Path) -> str:
    build_cluster_image(tmp_path / "layout", big_bytes=2 << 20, small_files=30)
    target = f"{registry.address}/faults/app:1"
    peerpull("convert", "--quiet", "--chunk-size", str(CHUNK), f"oci:{tmp_path / 'layout'}:latest", target)
    return target


class BadPeer:
    """A node that answers health checks but misbehaves on chunk requests (fault injection)."""

    def __init__(self, mode: str, node_id: str = "bad-peer") -> None:
        self.mode, self.node_id, self.served = mode, node_id, 0
        self.released = asyncio.Event()  # set at teardown: a "hang" lasts until then

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"node_id": self.node_id, "protocol": PROTOCOL_VERSION})

    async def chunks(self, request: web.Request) -> web.StreamResponse:
        refs = [ChunkRef.unpack(item) for item in msgpack.unpackb(await request.read())]
        self.served += len(refs)
        if self.mode == "hang":
            await self.released.wait()  # never answers while the reader waits
        items = [[i, "origin", random.Random(r.digest).randbytes(r.compressed_length)] for i, r in enumerate(refs)]
        if self.mode == "oversized":  # more bytes than any frame of the chunk can take
            items = [[i, "origin", b"\0" * (2 * r.length + 4096)] for i, r in enumerate(refs)]
        body = b"".join(msgpack.packb(item) for item in items)
        response = web.StreamResponse(headers={PROTOCOL_HEADER: PROTOCOL_VERSION})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if self.mode in ("corrupt", "oversized"):
            await response.write(body)
            await response.write_eof()
            return response
        await response.write(body[: len(body) // 2])  # "cut": dies mid-body
        assert request.transport is not None
        request.transport.close()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/health", self.health)
        app.router.add_post("/v1/chunks", self.chunks)
        return app


async def read_all(tmp_path: Path, image: str, registry_config: RegistryConfig, peer_addresses: set[str]) -> tuple[PeerMetrics, dict[str, bytes]]:
    """Fetch every chunk of `image` through a full fetcher whose peers are `peer_addresses`."""
    metrics = PeerMetrics()
    config = PeerConfig(peer_timeout_s=1.0)
    async with RegistryClient(registry_config) as client, aiohttp.ClientSession() as session:
        metrics.watch_registry_faults(client.faults)  # as PeerNode does
        refs, _ = await image_chunks(client, image)
        peers = PeerClient(session, "", config.peer_timeout_s)
        membership = Membership("me", peers, health_interval_s=60, failure_skip_s=60)
        membership.set_candidates(peer_addresses)
        await membership.check_once()
        cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
        fetcher = ChunkFetcher(cache, OriginSource(client, config), metrics, membership, peers)
        data = dict(zip([r.digest for r in refs], await asyncio.gather(*(fetcher.get(r) for r in refs))))
        cache.close()
    return metrics, data


async def reference_bytes(image: str) -> dict[str, bytes]:
    from converter.format.layer_reader import read_chunk
    from converter.registry.blob_reader import RegistryBlobReader
    from converter.registry.reference import ImageReference

    ref = ImageReference.parse(image)
    async with RegistryClient(RegistryConfig()) as client:
        refs, _ = await image_chunks(client, image)
        out = {}
        for r in refs:
            reader = RegistryBlobReader(client, ref, r.blob, 1 << 40)
            out[r.digest] = await read_chunk(reader, r.as_chunk())
    return out


@pytest.mark.parametrize("mode", ["corrupt", "cut", "hang", "oversized"])
async def test_a_misbehaving_owner_is_skipped_and_the_origin_serves(image: str, tmp_path: Path, mode: str) -> None:
    bad = BadPeer(mode)
    runner, address = await serve_local(bad.app())
    try:
        metrics, data = await read_all(tmp_path, image, RegistryConfig(), {address})
    finally:
        bad.released.set()
        await runner.cleanup()
    assert data == await reference_bytes(image)
    assert bad.served >= 1
    reasons = {"corrupt": "bad_bytes", "cut": "truncated", "hang": "timeout", "oversized": "oversized"}
    assert metrics.errors.labels("peer", reasons[mode])._value.get() >= 1
    assert metrics.requests.labels("peer")._value.get() == 0


async def test_registry_errors_and_timeouts_are_retried(registry, image: str, tmp_path: Path) -> None:
    proxy = await FaultProxy(registry.url).start()
    try:
        proxied = image.replace(registry.address, proxy.address)
        proxy.fail("/blobs/sha256", status=500, times=3)
        proxy.fail("/blobs/sha256", status=503, times=2)
        proxy.hold("/blobs/sha256", times=2)  # never answered: the client's read timeout must fire
        config = RegistryConfig(retries=8, backoff_base_s=0.01, read_timeout_s=1.0)
        metrics, data = await read_all(tmp_path, proxied, config, set())
        assert data == await reference_bytes(image)
        statuses = [s for s in proxy.served_statuses if s >= 500]
        assert len(statuses) == 5 and proxy.held == 2
        assert metrics.requests.labels("origin")._value.get() == len(data)
        # the faults show in peerpull's own metrics, not only in the test proxy
        page = parse_exposition(metrics.render().decode())
        assert page['peerpull_registry_faults_total{kind="http_500"}'] == 3
        assert page['peerpull_registry_faults_total{kind="http_503"}'] == 2
        assert page['peerpull_registry_faults_total{kind="timeout"}'] == 2
    finally:
        await proxy.stop()


def test_a_peer_killed_before_serving_falls_through_to_the_origin(registry, image: str, tmp_path: Path) -> None:
    from tests.support.peer_cluster import start_cluster

    # the survivor keeps believing in the dead node for a while; an ordinary (not split) warm-up asks
    # the dead owner for its chunks, which is the fall-through under test
    env = {"PEERPULL_PEER_HEALTH_INTERVAL_S": "5", "PEERPULL_PEER_WARM_SPLIT": "false"}
    nodes = start_cluster(tmp_path / "nodes", 2, extra_env=env)
    try:
        nodes[1].stop(kill=True)
        report = nodes[0].warm(image)
        expected = asyncio.run(reference_bytes(image))
        assert report["chunks"] == len(expected) and report["tiers"].get("origin") == len(expected)
        assert nodes[0].metric("peerpull_chunk_errors_total", 'reason="refused",tier="peer"') >= 1
    finally:
        nodes[0].stop()


def test_rendezvous_owners_are_stable_when_members_change() -> None:
    digests = [f"sha256:{i:064x}" for i in range(2000)]
    three = {d: owners(d, ["a", "b", "c"])[0] for d in digests}
    four = {d: owners(d, ["a", "b", "c", "d"])[0] for d in digests}
    moved = [d for d in digests if three[d] != four[d]]
    assert all(four[d] == "d" for d in moved)  # only chunks the newcomer now owns move
    assert 0.15 < len(moved) / len(digests) < 0.35
    assert {three[d] for d in digests} == {"a", "b", "c"}


class KillingRelay:
    """A TCP relay to a node process that SIGKILLs the process once `after` answer bytes went
    through: the node dies for real while it streams an answer (bytes past that point are lost
    with it)."""

    def __init__(self, target: tuple[str, int], pid: int, after: int) -> None:
        self.target, self.pid, self.after = target, pid, after
        self.relayed = 0
        self.killed = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                if count:
                    self.relayed += len(data)
                    if self.relayed >= self.after and not self.killed.is_set():
                        os.kill(self.pid, signal.SIGKILL)
                        self.killed.set()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_writer, False), self._pump(up_reader, writer, True))

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()


class OwnerAlways(Membership):
    """Every chunk's owner is the one peer (so every request goes to the node that will die)."""

    def candidates_for(self, digest: str):
        return [m for m in self.alive() if m.skip_until <= time.monotonic()][:1]


def test_a_peer_process_killed_mid_answer_falls_through_to_the_origin(registry, tmp_path: Path) -> None:
    from tests.support.peer_cluster import TOKEN, NodeProcess

    build_cluster_image(tmp_path / "layout", big_bytes=12 << 20, small_files=10)
    image = f"{registry.address}/faults/killed:1"
    peerpull("convert", "--quiet", "--chunk-size", str(CHUNK), f"oci:{tmp_path / 'layout'}:latest", image)
    node = NodeProcess(tmp_path, "doomed", free_port(), [], discovery="none").start()
    try:
        node.wait_members(1)
        assert node.warm(image)["tiers"]  # its cache holds every chunk: it will answer at once
        assert node.proc is not None

        async def read() -> tuple[PeerMetrics, dict[str, bytes], KillingRelay]:
            relay = KillingRelay((node.host, node.port), node.proc.pid, after=1 << 20)
            address = await relay.start()
            metrics = PeerMetrics()
            async with RegistryClient(RegistryConfig()) as client, aiohttp.ClientSession() as session:
                refs, _ = await image_chunks(client, image)
                peers = PeerClient(session, TOKEN, 30.0, read_timeout_s=10.0)
                membership = OwnerAlways("me", peers, health_interval_s=60, failure_skip_s=60)
                membership.set_candidates({address})
                await membership.check_once()
                assert membership.alive()
                cache = ChunkCache(str(tmp_path / "reader-cache"), 1 << 30)
                fetcher = ChunkFetcher(cache, OriginSource(client, PeerConfig()), metrics, membership, peers)
                data = dict(zip([r.digest for r in refs], await asyncio.gather(*(fetcher.get(r) for r in refs))))
                await fetcher.flush()
                cache.close()
            await relay.close()
            return metrics, data, relay

        metrics, data, relay = asyncio.run(read())
        assert relay.killed.is_set() and node.proc.wait(10) == -signal.SIGKILL
        assert data == asyncio.run(reference_bytes(image))  # every chunk verified, from one tier or the other
        assert metrics.errors.labels("peer", "truncated")._value.get() >= 1  # it died mid-answer
        assert metrics.requests.labels("peer")._value.get() >= 1 and metrics.requests.labels("origin")._value.get() >= 1
    finally:
        node.stop()


@pytest.mark.parametrize("mode, reasons", [
    ("silent", {"timeout"}), ("drip", {"malformed"}), ("drip_headers", {"timeout"}), ("garbage", None),
    ("endless", {"malformed", "oversized"}), ("huge", {"malformed", "oversized"}),  # whichever bound trips first
])
async def test_the_peer_client_gives_up_on_every_hostile_mode_within_its_deadline(mode: str, reasons: set[str] | None) -> None:
    ref = ChunkRef("sha256:" + "a" * 64, 65536, "127.0.0.1:1/x", "sha256:" + "b" * 64, 0, 70000)
    with HostileServer() as peer:
        peer.add("/v1/chunks", mode, interval=0.3, headers={PROTOCOL_HEADER: PROTOCOL_VERSION})
        async with aiohttp.ClientSession() as session:
            client = PeerClient(session, "", timeout_s=3.0, connect_timeout_s=1.0, read_timeout_s=1.0)
            with pytest.raises(PeerFetchError) as caught:
                # the outer bound only turns a hang (the bug) into a failure; the client's own deadlines end it
                await asyncio.wait_for(client.fetch_frame(peer.address, ref), 60)
    if reasons is not None:
        assert caught.value.reason in reasons, caught.value


async def test_a_slow_origin_at_the_owner_does_not_trip_the_askers_idle_timeout(image: str, tmp_path: Path) -> None:
    """The owner's misses take longer than the asker's idle timeout: heartbeats keep the answer alive."""
    from peer.node import PeerNode

    class SlowOrigin:
        def __init__(self, inner: OriginSource) -> None:
            self.inner = inner

        async def fetch_frame(self, ref: ChunkRef, background: bool = False) -> bytes:
            frame = await self.inner.fetch_frame(ref, background)
            await asyncio.sleep(1.5)  # fault injection: a slow registry (longer than the 1 s idle timeout)
            return frame

    owner_config = PeerConfig(cache_dir=str(tmp_path / "owner"), listen_host="127.0.0.1", listen_port=free_port(),
                              discovery="none", trusted_registries=("*",))
    owner = PeerNode(owner_config, RegistryConfig())
    ready = asyncio.Event()
    task = asyncio.ensure_future(owner.run(ready))
    await ready.wait()
    try:
        assert owner.fetcher is not None
        owner.fetcher._origin = SlowOrigin(owner.fetcher._origin)  # type: ignore[attr-defined]
        async with RegistryClient(RegistryConfig()) as client, aiohttp.ClientSession() as session:
            refs, _ = await image_chunks(client, image)
            peers = PeerClient(session, "", timeout_s=30.0, read_timeout_s=1.0)
            address = f"127.0.0.1:{owner_config.listen_port}"
            frames = await asyncio.gather(*(peers.fetch_frame(address, r) for r in refs[:8]))
        assert [tier for _, tier in frames] == ["origin"] * 8
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
