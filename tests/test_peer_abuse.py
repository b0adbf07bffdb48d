"""A `peerpull peer` process under abuse by hostile clients (real processes, loopback, bounded).

Whatever the abuse — duplicate digests, oversized batches, malformed or unknown digests, chunks
naming hosts the node does not trust, half-open connections, hundreds of clients at once — a
well-behaved peer keeps getting verified cached chunks, no request reaches an untrusted host, and
the serving process's memory stays bounded (read from /proc/PID/status).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import msgpack
import pytest

from converter.format.layer_reader import decompress_chunk
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from peer.chunk import ChunkRef
from peer.warm import image_chunks
from peerpull.testbed.registry import free_port
from tests.support.cli import assert_one_line_error, peerpull_cmd
from tests.support.hostile_server import HostileServer
from tests.support.peer_cluster import TOKEN, NodeProcess, build_cluster_image
from tests.support.waiting import wait_until
from tests.test_convert import peerpull

CHUNK = 256 * 1024
RSS_LIMIT_MB = 400


@pytest.fixture(scope="module")
def image(registry_session, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[ChunkRef]]:
    layout = tmp_path_factory.mktemp("abuse-layout")
    build_cluster_image(layout, big_bytes=6 << 20, small_files=40)
    target = f"{registry_session.address}/abuse/app:1"
    # format 1: a frame per small file, so the peers have hundreds of chunks to trade
    peerpull("convert", "--quiet", "--format-version", "1", "--chunk-size", str(CHUNK), f"oci:{layout}:latest", target)

    async def refs() -> list[ChunkRef]:
        async with RegistryClient(RegistryConfig()) as client:
            return (await image_chunks(client, target))[0]
    return target, asyncio.run(refs())


@pytest.fixture
def node(tmp_path: Path, image, request) -> Iterator[NodeProcess]:
    """A node whose cache holds every chunk of `image` (warmed on loopback)."""
    env = getattr(request, "param", {})
    proc = NodeProcess(tmp_path, "victim", free_port(), [], extra_env=env, discovery="none").start()
    try:
        proc.wait_members(1)
        report = proc.warm(image[0])
        assert report["chunks"] == len(image[1])
        yield proc
    finally:
        proc.stop()


def verify_all(items: dict[int, tuple[str, bytes]], refs: list[ChunkRef], tier: str = "cache") -> None:
    assert sorted(items) == list(range(len(refs)))
    for index, ref in enumerate(refs):
        got, frame = items[index]
        assert got == tier, (index, got)
        assert len(decompress_chunk(frame, ref.as_chunk()._replace(compressed_length=len(frame)))) == ref.length


def post_raw(node: NodeProcess, items: list[bytes], timeout: float = 60) -> tuple[int, bytes]:
    status, _, body = node.request("/v1/chunks", msgpack.packb(items, use_bin_type=True), timeout=timeout)
    return status, body


def test_duplicate_digests_are_answered_once_and_memory_stays_bounded(node: NodeProcess, image) -> None:
    refs = image[1]
    big = max(refs, key=lambda r: r.compressed_length)
    status, items = node.chunks([big] * 128)
    assert status == 200 and list(items) == [0]  # one answer for 128 copies
    verify_all(items, [big])
    assert node.metric("peerpull_peer_requests_refused_total", 'reason="duplicate"') == 127
    with ThreadPoolExecutor(10) as pool:  # 10 at once, each naming the same few digests 128 times in all
        batches = [[refs[i % 4] for i in range(128)] for _ in range(10)]
        for status, items in pool.map(node.chunks, batches):
            assert status == 200 and len(items) == 4
    assert node.rss_mb("VmHWM") < RSS_LIMIT_MB


def test_malformed_oversized_and_unknown_requests_are_refused_without_harm(node: NodeProcess, image) -> None:
    refs = image[1]
    good = refs[0]
    assert post_raw(node, [good.pack()] * 129)[0] == 400  # more than a batch may hold
    for digest in (good.digest + "\n", good.digest.upper().replace("SHA256", "sha256"), good.digest[:-1] + "g",
                   "sha256:" + "a" * 63, good.digest + "0"):
        bad = dataclasses.replace(good, digest=digest)
        status, body = post_raw(node, [bad.pack()])
        assert status == 400, (digest, body)
    status, _, _ = node.request("/v1/chunks", b"\x00" * (600 << 10))  # beyond the body limit
    assert status == 413
    assert post_raw(node, [])[0] == 400
    # a well-formed digest nobody has, in a trusted registry: "unavailable", and the node goes on
    unknown = dataclasses.replace(good, digest="sha256:" + "ee" * 32)
    status, items = node.chunks([unknown, good])
    assert status == 200 and items[0] == ("", b"")
    verify_all({0: items[1]}, [good])
    assert node.metric("peerpull_peer_requests_refused_total", 'reason="malformed"') >= 7


def test_chunks_naming_an_untrusted_registry_never_reach_it(node: NodeProcess, image, tmp_path: Path) -> None:
    refs = image[1]
    with HostileServer() as foreign:
        foreign.add("", "silent")  # would hold the node's slots for as long as it liked
        named = [dataclasses.replace(r, digest="sha256:%064x" % (i + 1), repository=f"{foreign.address}/x/y")
                 for i, r in enumerate(refs[:64])]
        with ThreadPoolExecutor(16) as pool:  # 64 requests naming it, and a well-behaved peer alongside
            answers = pool.map(lambda r: node.chunks([r], timeout=60), named)
            status, items = node.chunks(refs[:32])
            assert status == 200
            verify_all(items, refs[:32])
            for status, items in answers:
                assert status == 200 and items == {0: ("", b"")}
        assert foreign.seen == [] and foreign.connections == 0
    assert node.metric("peerpull_peer_requests_refused_total", 'reason="origin"') == 64


def _non_loopback_address() -> str | None:
    from peer.config import PeerConfig
    from peer.node import advertised_address

    address = advertised_address(PeerConfig())
    return None if address.startswith("127.") else address


def test_warm_from_another_host_for_an_untrusted_registry_is_refused(tmp_path: Path, image) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("no non-loopback address on this host to ask from")
    proc = NodeProcess(tmp_path, "open", free_port(), [], host="0.0.0.0", discovery="none").start()
    proc.address = f"{address}:{proc.port}"  # asked on the node's network address: not a local caller
    try:
        proc.wait_members(1)
        status, _, body = proc.request("/v1/warm", b'{"image": "%s"}' % image[0].encode())
        assert status == 403 and b"peer.trusted_registries" in body
        result = peerpull_cmd("warm", image[0], "--node", proc.address, env={**os.environ, "PEERPULL_PEER_TOKEN": TOKEN})
        assert_one_line_error(result, 2, "does not trust registry")
    finally:
        proc.stop()


@pytest.mark.parametrize("node", [{"PEERPULL_PEER_SERVE_ORIGIN_TIMEOUT_S": "2", "PEERPULL_PEER_MAX_CONCURRENT_SERVES": "4",
                                   "PEERPULL_PEER_TRUSTED_REGISTRIES": "*"}], indirect=True)
def test_cache_hits_do_not_wait_behind_misses_at_a_silent_trusted_registry(node: NodeProcess, image) -> None:
    refs = image[1]
    with HostileServer() as silent:
        silent.add("", "silent")  # trusted ("*"), but it never answers
        stuck = [dataclasses.replace(r, digest="sha256:%064x" % (i + 1), repository=f"{silent.address}/x/y")
                 for i, r in enumerate(refs[:64])]
        with ThreadPoolExecutor(32) as pool:
            answers = [pool.submit(node.chunks, [r], timeout=120) for r in stuck]
            wait_until(lambda: len(silent.seen) >= 1, 30, "the silent registry to be asked")
            status, items = node.chunks(refs)  # every slot for misses is held: hits still come
            assert status == 200
            verify_all(items, refs)
            for answer in answers:  # and the misses end at their deadline, not never
                status, items = answer.result(timeout=120)
                assert status == 200 and items == {0: ("", b"")}
    assert node.metric("peerpull_peer_requests_refused_total", 'reason="origin_timeout"') >= 1


@pytest.mark.parametrize("node", [{"PEERPULL_PEER_HEADER_TIMEOUT_S": "2", "PEERPULL_PEER_MAX_CONNECTIONS": "1000"}],
                         indirect=True)
def test_half_open_connections_are_closed_and_a_good_peer_still_gets_in(node: NodeProcess, image) -> None:
    refs = image[1]
    sockets = []
    try:
        for _ in range(1500):  # more than the cap: the oldest idle ones make room
            s = socket.create_connection((node.host, node.port))
            s.sendall(b"POST /v1/chunks HTTP/1.1\r\nHost: x\r\nContent-Len")
            s.setblocking(False)
            sockets.append(s)
        status, items = node.chunks(refs[:16])  # a fresh connection, while the flood is open
        assert status == 200
        verify_all(items, refs[:16])

        def closed(s: socket.socket) -> bool:
            try:
                return s.recv(1) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

        open_ = set(sockets)
        def all_closed() -> bool:
            open_.difference_update([s for s in list(open_) if closed(s)])
            return not open_
        wait_until(all_closed, 60, "the server to close every half-open connection", poll_s=0.2)
        assert node.metric("peerpull_peer_requests_refused_total", 'reason="connections"') >= 500
        assert node.rss_mb("VmHWM") < RSS_LIMIT_MB
    finally:
        for s in sockets:
            s.close()


def test_five_hundred_clients_at_once_and_a_good_peer_alongside(node: NodeProcess, image) -> None:
    refs = image[1]
    small = sorted(refs, key=lambda r: r.compressed_length)[:40]
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def one(session: aiohttp.ClientSession, n: int) -> int:
        mine = [small[(n + k) % len(small)] for k in range(4)]
        body = msgpack.packb([r.pack() for r in mine], use_bin_type=True)
        async with session.post(f"http://{node.address}/v1/chunks", data=body, headers=headers) as resp:
            assert resp.status == 200
            items = {i: (t, f) for i, t, f in msgpack.Unpacker(io.BytesIO(await resp.read()), raw=False) if i != -1}
        if n % 25 == 0:
            verify_all(items, mine)
        return len(items)

    async def crowd() -> list[int]:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            return await asyncio.gather(*(one(session, n) for n in range(500)))

    with ThreadPoolExecutor(1) as pool:
        crowd_done = pool.submit(asyncio.run, crowd())
        status, items = node.chunks(refs)  # a well-behaved peer in the middle of the crowd
        assert status == 200
        verify_all(items, refs)
        assert crowd_done.result(timeout=300) == [4] * 500
    assert node.rss_mb("VmHWM") < RSS_LIMIT_MB


@pytest.mark.parametrize("node", [{"PEERPULL_PEER_HEADER_TIMEOUT_S": "2", "PEERPULL_PEER_SERVE_TOTAL_BYTES": str(4 << 20),
                                   "PEERPULL_PEER_SERVE_CONNECTION_BYTES": str(1 << 20)}], indirect=True)
def test_clients_that_never_read_their_answers_cannot_starve_the_others(node: NodeProcess, image) -> None:
    refs = image[1]
    body = msgpack.packb([r.pack() for r in refs], use_bin_type=True)
    request = (f"POST /v1/chunks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    readers_that_stall = []
    try:
        for _ in range(12):  # each asks for everything and reads nothing: together more than the total budget
            s = socket.create_connection((node.host, node.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request)
            readers_that_stall.append(s)
        status, items = node.chunks(refs, timeout=120)  # served once the stalled ones are cut off
        assert status == 200
        verify_all(items, refs)
        assert node.metric("peerpull_peer_requests_refused_total", 'reason="slow_reader"') >= 1
    finally:
        for s in readers_that_stall:
            s.close()
