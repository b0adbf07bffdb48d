"""Simulated nodes built from the real peer code, and the cluster that starts them all at once.

Each node runs peerpull's own `Membership` (ring, fan-out tree, failure skip), `ChunkFetcher`
(tier order, single-flight, the hop rules), `PeerSources` (load-aware, hedged choice),
`PeerClient`'s batching (its `BatchQueue`, `MAX_BATCH`, `INFLIGHT_PER_PEER`), `OriginSource`
(coalesced Range requests, priority slots, on-the-wire joining) and `Streamer` (the startup
profile's plan and workers). Only what touches the outside is replaced: the HTTP of a peer
request and of a Range request goes over `Net`, the disk cache is a dict, verification checks
the frame against its digest without threads, and the peer server's answer is the few lines of
`PeerServer._serve_miss` (a hit is sent, a miss fetched with `use_peers=False` in bounded slots).
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from converter.format.errors import FormatError
from peer.chunk import ChunkRef
from peer.client import PeerClient, PeerFetchError, _Waiters
from peer.config import PeerConfig
from peer.fetcher import ChunkFetcher
from peer.membership import Membership
from peer.metrics import PeerMetrics
from peer.origin import OriginSource
from peer.stream import Streamer

from .feed import Feed
from .net import REGISTRY, Net

MB = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class Shape:
    node_mbit: float = 1000.0  # each node's uplink and downlink
    registry_mbit: float = 2500.0  # the registry's egress cap
    latency_s: float = 0.0005  # one way between any two hosts
    slow_factor: float = 20.0  # a slow peer's uplink is this many times slower


class SimCache:
    """What the fetcher and the streamer ask of a ChunkCache, over a dict."""

    def __init__(self) -> None:
        self.frames: dict[str, bytes] = {}

    def might_have(self, digest: str) -> bool:
        return digest in self.frames

    def known(self, digest: str) -> bool:
        return digest in self.frames

    async def contains(self, digest: str) -> bool:
        return digest in self.frames

    async def load(self, ref: ChunkRef) -> tuple[bytes, bytes] | None:
        frame = self.frames.get(ref.digest)
        return None if frame is None else (frame, frame)

    async def load_frame(self, ref: ChunkRef) -> bytes | None:
        return self.frames.get(ref.digest)


class SimRegistry:
    """The registry's `read_range` for OriginSource: a Range answer over the registry's link."""

    def __init__(self, net: Net, feed: Feed, node: str) -> None:
        self._net, self._feed, self._node = net, feed, node

    async def read_range(self, image: Any, blob: str, start: int, length: int) -> bytes:
        await self._net.hop()
        await self._net.transfer(REGISTRY, self._node, length)
        return self._feed.blob_range(blob, start, length)

    async def read_range_pieces(self, image: Any, blob: str, start: int, length: int,
                                pieces: Sequence[tuple[int, int]]) -> list[bytes]:
        data = await self.read_range(image, blob, start, length)
        return [data[a:a + n] for a, n in pieces]


class SimFetcher(ChunkFetcher):
    """The real fetcher; verification checks the frame against the feed, inline (no threads)."""

    def __init__(self, node: SimNode, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._node = node

    async def _verify(self, ref: ChunkRef, frame: bytes, background: bool) -> bytes:
        feed = self._node.cluster.feed
        if not feed.valid(ref, frame):
            raise FormatError(f"frame of {ref.digest} does not match its digest")
        kept = feed.kept(ref, frame)
        self._node.cache.frames[ref.digest] = kept
        return kept


class SimPeerClient(PeerClient):
    """The real client's batching; a batch's request and answer go over the simulated links."""

    def __init__(self, node: SimNode, config: PeerConfig) -> None:
        super().__init__(None, "", config.peer_timeout_s, config.peer_connect_timeout_s,  # type: ignore[arg-type]
                         config.peer_read_timeout_s)
        self._node = node
        self._connect_s = config.peer_connect_timeout_s
        self._total_s = config.peer_timeout_s

    async def _post(self, address: str, refs: list[ChunkRef], waiters: _Waiters) -> None:
        cluster = self._node.cluster
        peer = cluster.nodes.get(address)
        if peer is None or peer.state == "gone":  # shut down: the connection is refused at once
            await cluster.net.hop()
            await cluster.net.hop()
            raise PeerFetchError(f"peer {address} refused the connection", "refused")
        if peer.state == "dead":  # crashed without a word: nothing answers the SYN
            await asyncio.sleep(self._connect_s)
            raise PeerFetchError(f"peer {address} timed out", "timeout")
        limits = [max(r.compressed_length, len(r.digest) + 1) for r in refs]
        pending = dict(enumerate(refs))
        try:
            async with asyncio.timeout(self._total_s):
                await cluster.net.hop()
                await asyncio.gather(*(self._item(peer, i, ref, pending, waiters, limits)
                                       for i, ref in enumerate(refs)))
        except TimeoutError:
            raise PeerFetchError(f"peer {address} timed out", "timeout") from None
        if pending:
            raise PeerFetchError(f"peer {address} ended its answer early", "truncated")

    async def _item(self, peer: SimNode, index: int, ref: ChunkRef, pending: dict[int, ChunkRef],
                    waiters: _Waiters, limits: list[int]) -> None:
        tier, frame = await peer.serve(ref)
        if peer.state != "up":
            raise PeerFetchError(f"peer {peer.node_id} died mid-body", "truncated")
        await self._node.cluster.net.transfer(peer.node_id, self._node.node_id, ref.compressed_length if frame else 64)
        self._deliver(peer.node_id, [index, tier, frame], pending, waiters, limits)


@dataclass
class SimNode:
    cluster: Cluster
    node_id: str
    started_at: float
    state: str = "up"  # up, dead (silent), gone (left: refuses)
    ready_at: float | None = None
    cache: SimCache = field(default_factory=SimCache)

    def __post_init__(self) -> None:
        config = self.cluster.config
        loop = asyncio.get_running_loop()
        self.client = SimPeerClient(self, config)
        self.membership = Membership(self.node_id, self.client, config.health_interval_s, config.failure_skip_s,
                                     fanout=config.fanout, clock=loop.time)
        self.origin = OriginSource(SimRegistry(self.cluster.net, self.cluster.feed, self.node_id),  # type: ignore[arg-type]
                                   config)
        self.fetcher = SimFetcher(self, self.cache, self.origin, self.cluster.metrics, self.membership, self.client,
                                  hedge_after_s=config.hedge_after_s, clock=loop.time)
        self.streamer = Streamer(self.fetcher, self.origin, self.cache, config, self.membership)  # type: ignore[arg-type]
        self._serve_slots = asyncio.Semaphore(config.max_concurrent_serves)
        self.task: asyncio.Task[None] | None = None

    async def serve(self, ref: ChunkRef) -> tuple[str, bytes]:
        """PeerServer's answer for one requested chunk: a hit at once, a miss fetched for the asker."""
        frame = self.cache.frames.get(ref.digest)
        if frame is not None:
            return "cache", frame
        try:
            async with asyncio.timeout(self.cluster.config.serve_origin_timeout_s), self._serve_slots:
                frame, tier = await self.fetcher.fetch_frame(ref, use_peers=False)
                return tier, frame
        except Exception:  # noqa: BLE001 — "unavailable" to the asker, as the real server answers
            return "", b""

    async def start(self) -> None:
        """Stream the startup profile, then read whatever the stream left (as the container would)."""
        feed = self.cluster.feed
        await self.streamer.stream(feed.refs, "startup", quiet=True)
        for ref in feed.refs:
            if ref.digest not in self.cache.frames:
                await self.fetcher.get(ref)
        self.ready_at = asyncio.get_running_loop().time()

    def complete(self) -> bool:
        feed = self.cluster.feed
        return all(ref.digest in self.cache.frames and feed.valid(ref, self.cache.frames[ref.digest])
                   for ref in feed.refs)


@dataclass
class Scenario:
    nodes: int
    churn: float = 0.0  # share of nodes that join, and as many that leave, during the start
    faulty: float = 0.0  # share of nodes that are slow (half) or dead (half)
    churn_window_s: float = 10.0  # joins and leaves happen within this window
    seed: int = 1


class Cluster:
    def __init__(self, feed: Feed, config: PeerConfig, shape: Shape) -> None:
        self.feed = feed
        self.config = config
        self.shape = shape
        self.net = Net(shape.latency_s)
        self.net.add(REGISTRY, shape.registry_mbit * MB, 100_000 * MB)
        self.nodes: dict[str, SimNode] = {}
        self.metrics = PeerMetrics()  # shared: nothing here reads them
        self._phases: dict[str, int] = {}

    def add(self, node_id: str, slow: bool = False) -> SimNode:
        up = self.shape.node_mbit * MB / (self.shape.slow_factor if slow else 1.0)
        self.net.add(node_id, up, self.shape.node_mbit * MB)
        return self.nodes.setdefault(node_id, SimNode(self, node_id, asyncio.get_running_loop().time()))

    def discover(self, node: SimNode) -> None:
        """Discovery and a first health round of `node` (the others hear of a new node at their next round)."""
        node.membership.begin_round()
        for other in self.live():
            node.membership.heard(other.node_id, {"node_id": other.node_id})

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.state == "up"]

    async def health_rounds(self, phases: int = 4) -> None:
        """Every node's health checks, each node in one of a few phases of the interval (the rounds
        of real nodes are not aligned; a few phases keep the number of distinct views small)."""
        interval = self.config.health_interval_s
        step = 0
        while True:
            await asyncio.sleep(interval / phases)
            live = self.live()
            for node in live:
                if zlib.crc32(node.node_id.encode()) % phases != step % phases:
                    continue
                node.membership.begin_round()
                for other in live:
                    node.membership.heard(other.node_id, {"node_id": other.node_id})
                node.membership.end_round()
            step += 1


@dataclass
class Outcome:
    nodes: int
    ready_s: list[float]  # time to working set of every node that finished (joiners from their join)
    egress_bytes: int
    uploads: list[int]  # bytes each node uploaded (nodes that ran to the end)
    complete: bool  # every finished node holds every working-set frame, each valid
    hedges: int
    unfinished: int  # nodes that stayed up but did not finish
    first_arrivals: tuple[str, ...] = ()  # the first node's frames in the order they reached its cache
    ready_by_node: dict[str, float] = field(default_factory=dict)  # node id → time to working set
    faulty: dict[str, str] = field(default_factory=dict)  # node id → "slow" or "dead"


async def run_scenario(feed: Feed, config: PeerConfig, shape: Shape, scenario: Scenario) -> Outcome:
    rng = random.Random(scenario.seed)
    cluster = Cluster(feed, config, shape)
    n = scenario.nodes
    ids = [f"node-{i:04d}" for i in range(n)]
    faulty = set(rng.sample(ids, int(round(n * scenario.faulty))))
    slow = set(sorted(faulty)[::2])
    dead = faulty - slow
    for node_id in ids:
        cluster.add(node_id, slow=node_id in slow)
    for node in cluster.nodes.values():
        cluster.discover(node)
    rounds = asyncio.create_task(cluster.health_rounds())
    for node in cluster.nodes.values():
        node.task = asyncio.create_task(node.start())
    for node_id in dead:  # crashed just after the start: still listed by every peer
        cluster.nodes[node_id].state = "dead"
        task = cluster.nodes[node_id].task
        assert task is not None
        task.cancel()
    events = int(round(n * scenario.churn))
    leavers = rng.sample([i for i in ids if i not in faulty], min(events, n - len(faulty) - 1)) if events else []
    timeline = sorted([(rng.uniform(0, scenario.churn_window_s), "leave", i) for i in leavers]
                      + [(rng.uniform(0, scenario.churn_window_s), "join", f"join-{j:04d}") for j in range(events)])
    loop = asyncio.get_running_loop()
    for at, what, node_id in timeline:
        await asyncio.sleep(max(0.0, at - loop.time()))
        if what == "leave":
            node = cluster.nodes[node_id]
            node.state = "gone"
            if node.task is not None:
                node.task.cancel()
        else:
            node = cluster.add(node_id)
            cluster.discover(node)
            node.task = asyncio.create_task(node.start())
    running = [n.task for n in cluster.nodes.values() if n.state == "up" and n.task is not None]
    await asyncio.gather(*running, return_exceptions=True)
    rounds.cancel()
    await asyncio.gather(rounds, return_exceptions=True)
    finished = [n for n in cluster.nodes.values() if n.state == "up" and n.ready_at is not None]
    for node in cluster.nodes.values():
        await node.fetcher.cancel_fetches()
        node.fetcher.close()
    hedges = sum(n.fetcher._sources.hedges for n in cluster.nodes.values() if n.fetcher._sources is not None)
    return Outcome(
        nodes=n,
        ready_s=sorted(node.ready_at - node.started_at for node in finished if node.ready_at is not None),
        egress_bytes=cluster.net.links[REGISTRY].uploaded,
        uploads=[cluster.net.links[node.node_id].uploaded for node in finished],
        complete=all(node.complete() for node in finished),
        hedges=hedges,
        unfinished=sum(1 for node in cluster.nodes.values() if node.state == "up" and node.ready_at is None),
        first_arrivals=tuple(cluster.nodes[ids[0]].cache.frames),
        ready_by_node={node.node_id: node.ready_at - node.started_at for node in finished if node.ready_at is not None},
        faulty={**{i: "slow" for i in slow}, **{i: "dead" for i in dead}},
    )
