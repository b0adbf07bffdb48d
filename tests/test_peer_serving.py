"""The peer serving path (peer/server.py, peer/cache.py read path, peer/client.py): cache hits are
read in groups with one query, frames of their own file go out with sendfile, the client pipelines
its batches; the bytes are the stored ones, and corrupt stored bytes never pass as good.

In-process parts use a real ChunkCache, a real PeerServer on a random port and the real PeerClient;
the corruption tests use a real `peerpull peer` process, a real registry and the real fetcher."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import diskcache
import msgpack
import pytest
import zstandard
from aiohttp import web

from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from peer.batching import Batch, BatchQueue, oldest
from peer.cache import ChunkCache, FrameFile
from peer.chunk import ChunkRef
from peer.client import INFLIGHT_PER_PEER, MAX_BATCH, PeerClient
from peer.config import PeerConfig
from peer.metrics import PeerMetrics, parse_exposition
from peer.policy import OriginPolicy
from peer.server import PeerServer, item_head
from peer.warm import image_chunks
from tests.support.peer_cluster import TOKEN, NodeProcess, build_cluster_image, start_cluster
from tests.test_convert import peerpull
from tests.test_stream_peers import Local, knows_holdings

FILE_MIN = 32 << 10  # diskcache keeps values of this size and more in files of their own


def frames(count: int, seed: int = 5) -> list[tuple[ChunkRef, bytes]]:
    """Frames with zstd's checksum, half small (stored inline), half large (stored in files)."""
    rnd = random.Random(seed)
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)
    out = []
    for i in range(count):
        size = rnd.randint(100, 20_000) if i % 2 else rnd.randint(FILE_MIN * 2, 400_000)
        data = rnd.randbytes(size)  # incompressible: a large chunk gives a large frame
        frame = cctx.compress(data)
        ref = ChunkRef("sha256:" + hashlib.sha256(data).hexdigest(), size, "127.0.0.1:9/none/app",
                       "sha256:" + "0" * 64, i * 1000, len(frame))
        out.append((ref, frame))
    return out


@pytest.mark.parametrize("size", [1, 255, 256, 65_535, 65_536, 1 << 20])
def test_an_item_head_and_the_frame_after_it_are_the_packed_item(size: int) -> None:
    frame = os.urandom(size)
    assert item_head(3, "cache", size) + frame == msgpack.packb([3, "cache", frame], use_bin_type=True)


class Served:
    """A PeerServer on a random loopback port over a filled cache, counting /v1/chunks requests
    in flight at once."""

    def __init__(self, tmp_path: Path, stored: list[tuple[ChunkRef, bytes]], sendfile: bool = True) -> None:
        self.cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
        self.cache.store_batch(stored)
        self.config = PeerConfig(token=TOKEN, serve_sendfile=sendfile)
        self.metrics = PeerMetrics()
        self.server = PeerServer("served", None, self.cache, self.metrics, self.config,  # type: ignore[arg-type]
                                 OriginPolicy(()))
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests = 0

    @web.middleware
    async def count(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.005)  # a little latency: requests overlap only if the client pipelines
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def __aenter__(self) -> str:
        self.runner = web.AppRunner(self.server.app((self.count,)), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        self.server.close()
        self.cache.close()


def test_large_stored_frames_are_read_as_open_files_and_small_ones_as_bytes(tmp_path: Path) -> None:
    stored = frames(40)
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    try:
        cache.store_batch(stored)
        loaded = cache.load_frames([ref for ref, _ in stored], files=True)
        try:
            for (_, frame), hit in zip(stored, loaded):
                assert isinstance(hit, FrameFile) == (len(frame) >= FILE_MIN)
                assert hit is not None and (hit.read() if isinstance(hit, FrameFile) else hit) == frame
        finally:
            for hit in loaded:
                if isinstance(hit, FrameFile):
                    hit.close()
        assert cache.load_frames([ref for ref, _ in stored]) == [frame for _, frame in stored]
    finally:
        cache.close()


@pytest.mark.parametrize("sendfile", [True, False])
async def test_a_peer_gets_exactly_the_stored_bytes_with_requests_pipelined(tmp_path: Path, sendfile: bool) -> None:
    stored = frames(3 * MAX_BATCH + 17)
    served = Served(tmp_path, stored, sendfile)
    async with served as address, aiohttp.ClientSession() as session:
        client = PeerClient(session, TOKEN, 30.0)
        got = await asyncio.gather(*(client.fetch_frame(address, ref) for ref, _ in stored))
    assert [frame for frame, _ in got] == [frame for _, frame in stored]
    assert {tier for _, tier in got} == {"cache"}
    metrics = parse_exposition(served.metrics.render().decode())
    assert metrics['peerpull_served_chunks_total{source="cache"}'] == len(stored)
    assert metrics["peerpull_served_bytes_total"] == sum(len(frame) for _, frame in stored)
    # pipelined: the client's slots overlap their requests; batched: few requests for many chunks
    assert served.most_in_flight == INFLIGHT_PER_PEER
    assert served.requests <= INFLIGHT_PER_PEER + -(-len(stored) // MAX_BATCH)


async def test_a_stored_frame_whose_size_is_wrong_is_dropped_not_served(tmp_path: Path) -> None:
    stored = frames(6)
    served = Served(tmp_path, stored)
    big = [ref for ref, frame in stored if len(frame) >= FILE_MIN]
    with diskcache.Cache(str(tmp_path / "cache")) as raw:
        (filename,) = raw._sql("SELECT filename FROM Cache WHERE key = ?", (big[0].digest,)).fetchone()
    os.truncate(tmp_path / "cache" / filename, 1000)
    async with served as address, aiohttp.ClientSession() as session:
        body = msgpack.packb([ref.pack() for ref, _ in stored], use_bin_type=True)
        async with session.post(f"http://{address}/v1/chunks", data=body,
                                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            items = {i: (tier, frame) for i, tier, frame in msgpack.Unpacker(
                io.BytesIO(await resp.read()), raw=False) if i >= 0}
    bad = next(i for i, (ref, _) in enumerate(stored) if ref == big[0])
    # no origin is trusted here: the truncated frame is a miss this node cannot fill
    assert items[bad] == ("", b"")
    assert all(items[i] == ("cache", frame) for i, (_, frame) in enumerate(stored) if i != bad)
    reopened = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    try:
        assert reopened.load_frames([big[0]], files=True) == [None]  # the entry is gone
    finally:
        reopened.close()


# ---- batching: a slot is never handed on while batches wait ----------------------------------


async def test_a_waiter_whose_request_is_in_flight_sends_the_next_batch_with_its_slot() -> None:
    senders: list[tuple[list[int], asyncio.Task[object] | None]] = []
    release = asyncio.Event()

    async def send(key: str, batch: Batch[int, int]) -> None:
        senders.append(([r for r, _ in batch], asyncio.current_task()))
        await release.wait()
        for request, future in batch:
            if not future.done():
                future.set_result(request)

    queue: BatchQueue[str, int, int] = BatchQueue(send, oldest(2), send_others=True)
    sem = asyncio.Semaphore(2)
    await sem.acquire()
    await sem.acquire()  # both slots busy: every request queues
    tasks = [asyncio.create_task(queue.submit("peer", i, lambda: sem)) for i in range(6)]
    while queue.queued("peer") < 6:
        await asyncio.sleep(0)
    sem.release()
    sem.release()
    while len(senders) < 2:
        await asyncio.sleep(0)
    # the second slot went to task 1, whose request left with task 0's batch: it sent the next batch
    assert [s[0] for s in senders] == [[0, 1], [2, 3]]
    assert senders[1][1] is tasks[1]
    release.set()
    assert await asyncio.gather(*tasks) == list(range(6))
    assert sorted(r for s in senders for r in s[0]) == list(range(6))


async def test_a_waiter_whose_answer_has_come_does_not_send_for_others() -> None:
    sent: list[list[int]] = []

    async def send(key: str, batch: Batch[int, int]) -> None:
        sent.append([r for r, _ in batch])
        for request, future in batch:
            future.set_result(request)

    queue: BatchQueue[str, int, int] = BatchQueue(send, oldest(128), send_others=True)
    sem = asyncio.Semaphore(1)
    await sem.acquire()
    tasks = [asyncio.create_task(queue.submit("peer", i, lambda: sem)) for i in range(4)]
    while queue.queued("peer") < 4:
        await asyncio.sleep(0)
    sem.release()
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3]
    assert sent == [[0, 1, 2, 3]]


# ---- corrupt stored bytes with a real node: the receiver rejects them and falls back -----------


@pytest.fixture(scope="module")
def image(registry_session, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("peer-serving") / "layout"
    build_cluster_image(layout, big_bytes=2 << 20, small_files=40)
    target = f"{registry_session.address}/peer-serving/app:1"
    peerpull("convert", "--quiet", "--chunk-size", str(256 << 10), f"oci:{layout}:latest", target)
    return target


@pytest.fixture
def warm_node(registry_session, image: str, tmp_path: Path) -> Iterator[tuple[NodeProcess, Path]]:
    (node,) = start_cluster(tmp_path / "nodes", 1,
                            extra_env={"PEERPULL_PEER_TRUSTED_REGISTRIES": registry_session.address})
    try:
        assert node.warm(image)["chunks"] > 0
        yield node, tmp_path / "nodes" / node.node_id
    finally:
        node.stop()


def stored_files(cache_dir: Path) -> dict[str, Path]:
    """digest → the file a node's cache keeps that frame in (read from outside the node process)."""
    with diskcache.Cache(str(cache_dir)) as raw:
        rows = raw._sql("SELECT key, filename FROM Cache WHERE filename IS NOT NULL").fetchall()
    return {key: cache_dir / filename for key, filename in rows}


@pytest.fixture
async def refs(image: str) -> AsyncIterator[list[ChunkRef]]:
    async with RegistryClient(RegistryConfig()) as client:
        yield (await image_chunks(client, image))[0]


async def test_a_flipped_byte_in_a_served_file_is_rejected_by_the_receiver_which_falls_back(
        registry_session, warm_node: tuple[NodeProcess, Path], refs: list[ChunkRef], tmp_path: Path) -> None:
    node, cache_dir = warm_node
    files = stored_files(cache_dir)
    victim = next(ref for ref in refs if ref.digest in files)
    path = files[victim.digest]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: the server's size check passes, the digest cannot
    path.write_bytes(bytes(data))
    status, items = node.chunks([victim])
    assert status == 200 and items[0] == ("cache", bytes(data))  # served as stored: the asker verifies
    async with RegistryClient(RegistryConfig()) as client, aiohttp.ClientSession() as session:
        local = Local(client, session, tmp_path, node.address)
        try:
            await knows_holdings(local, [victim])
            tier = await local.fetcher.ensure(victim, use_peers=True, background=False)
            await local.fetcher.flush()
            loaded = await local.cache.load(victim)
            assert tier == "origin"
            assert loaded is not None and "sha256:" + hashlib.sha256(loaded[1]).hexdigest() == victim.digest
            metrics = parse_exposition(local.fetcher._metrics.render().decode())
            assert metrics['peerpull_chunk_errors_total{reason="bad_bytes",tier="peer"}'] == 1
        finally:
            await local.close()


def test_a_truncated_file_is_not_served_from_the_cache_but_fetched_again(
        warm_node: tuple[NodeProcess, Path], refs: list[ChunkRef]) -> None:
    node, cache_dir = warm_node
    files = stored_files(cache_dir)
    victim = next(ref for ref in refs if ref.digest in files)
    os.truncate(files[victim.digest], 100)
    status, items = node.chunks([victim])
    assert status == 200
    tier, frame = items[0]
    assert tier == "origin"  # the node trusts the registry: it fetched the frame again
    data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=victim.length)
    assert "sha256:" + hashlib.sha256(data).hexdigest() == victim.digest
