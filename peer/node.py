"""One node's peer component: cache, fetch tiers, peer server, discovery and membership, with one
lifecycle (AsyncExitStack + TaskGroup; teardown in reverse order of creation).

`peerpull peer` runs it alone; the node daemon embeds the same component.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sqlite3
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from converter.format.errors import ConfigError
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from peer.cache import ChunkCache
from peer.client import PeerClient
from peer.config import PeerConfig
from peer.discovery import make_discovery
from peer.fetcher import ChunkFetcher
from peer.listener import GuardedListener
from peer.malloc import keep_trimmed, tune_malloc
from peer.membership import Membership
from peer.metrics import PeerMetrics
from peer.origin import OriginSource
from peer.policy import OriginPolicy
from peer.server import PeerServer, ProfileReader
from peer.status import EventRing, NodeStatus
from peer.stream import Streamer
from peer.warm import Split, WarmProgress, image_chunks, warm

log = structlog.get_logger(__name__)


def advertised_address(config: PeerConfig) -> str:
    if config.advertise_host:
        return config.advertise_host
    if config.listen_host not in ("0.0.0.0", "::", ""):
        return config.listen_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # no packet is sent: this picks the route's source
        try:
            s.connect(("192.0.2.1", 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(config: PeerConfig) -> None:
    """No open peer server on the network unless asked for in so many words."""
    if config.token or config.insecure_no_token or is_loopback_host(config.listen_host):
        return
    raise ConfigError(f"no cluster token: the peer server would listen on {config.listen_host}:{config.listen_port} "
                      "open to anyone on the network; set one (PEERPULL_PEER_TOKEN or [peer] token), listen on "
                      "127.0.0.1, or pass --insecure-no-token (peer.insecure_no_token = true)")


def open_cache(config: PeerConfig) -> ChunkCache:
    """The disk cache, or a ConfigError naming the directory and the fix."""
    path = Path(config.cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".peerpull-write-test-"):
            pass
        return ChunkCache(str(path), config.cache_max_bytes)
    except (OSError, sqlite3.Error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cache directory {path} is not usable ({reason}): give a writable directory "
                          "(--cache-dir DIR, peer.cache_dir)") from None


class PeerNode:
    def __init__(self, peer: PeerConfig, registry: RegistryConfig) -> None:
        self.config = peer
        self.node_id = peer.node_id or socket.gethostname()
        self.address = advertised_address(peer)
        self._registry_config = registry
        self.metrics = PeerMetrics()
        self.fetcher: ChunkFetcher | None = None
        self.cache: ChunkCache | None = None  # once run() has opened it (the snapshotter asks what it holds)
        self.streamer: Streamer | None = None  # streams of frames for the snapshotter (peer/stream.py)
        self.membership: Membership | None = None
        self.policy = OriginPolicy(peer.trusted_registries)
        self.listener: GuardedListener | None = None
        self._client: RegistryClient | None = None
        self._peers: PeerClient | None = None  # set by run(): a split warm-up fetches owners' filters with it
        self.profiles: ProfileReader | None = None  # set by the node daemon: startup profiles it keeps
        self.status: NodeStatus | None = None  # what /v1/status answers (peer/status.py), once run() started

    @property
    def registry(self) -> RegistryClient | None:
        """The registry client, once run() has started."""
        return self._client

    def trust_registry(self, registry: str) -> None:
        """This node's own snapshotter resolves layers from `registry`: peers may ask us to fetch from it."""
        self.policy.learn(registry)

    async def warm_image(self, image: str, progress: WarmProgress | None = None) -> dict[str, object]:
        assert self.fetcher is not None and self._client is not None
        refs, skipped = await image_chunks(self._client, image)
        split = (Split(self.membership, self.config.warm_owner_wait_s, self._peers.summary if self._peers else None)
                 if self.config.warm_split and self.membership else None)
        report = await warm(self.fetcher, refs, self.config.prefetch_parallel, progress, split)
        report["layers_not_seekable"] = skipped
        log.info("image_warmed", image=image, **report)
        return report

    async def _profile(self, manifest_digest: str) -> bytes | None:
        return await self.profiles(manifest_digest) if self.profiles is not None else None

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled."""
        check_token(self.config)
        tune_malloc()  # before the threads and buffers: resident memory follows what the node holds
        async with AsyncExitStack() as stack:
            cache = await asyncio.to_thread(open_cache, self.config)
            stack.callback(cache.close)
            cache.start_index()
            self.cache = cache
            self._client = await stack.enter_async_context(RegistryClient(self._registry_config))
            self.metrics.watch_registry_faults(self._client.faults)
            session = await stack.enter_async_context(aiohttp.ClientSession())
            peers = PeerClient(session, self.config.token, self.config.peer_timeout_s,
                               self.config.peer_connect_timeout_s, self.config.peer_read_timeout_s)
            self._peers = peers
            self.membership = Membership(self.node_id, peers, self.config.health_interval_s, self.config.failure_skip_s,
                                         fanout=self.config.fanout)
            origin = OriginSource(self._client, self.config)
            stack.push_async_callback(origin.close)
            self.fetcher = ChunkFetcher(cache, origin, self.metrics, self.membership, peers,
                                        self.config.cache_write_pending_bytes, self.config.hedge_after_s)
            self.streamer = Streamer(self.fetcher, origin, cache, self.config, self.membership)
            stack.callback(self.fetcher.close)
            stack.push_async_callback(self.fetcher.cancel_fetches)
            events = stack.enter_context(EventRing())
            self.status = NodeStatus(self.node_id, self.config, self.metrics, cache, self.membership, events)
            server = PeerServer(self.node_id, self.fetcher, cache, self.metrics, self.config, self.policy,
                                warm=self.warm_image, profiles=self._profile, status=self.status.snapshot)
            fetcher, streamer = self.fetcher, self.streamer
            self.metrics.watch_memory({"cache_writer": lambda: fetcher.writer.held_bytes,
                                       "origin_staged": lambda: origin.staged_bytes,
                                       "stream": lambda: streamer.bytes_in_flight,
                                       "serve": lambda: server.bytes_in_flight})
            stack.callback(server.close)
            listener = GuardedListener(self.config.header_timeout_s, self.config.max_connections,
                                       on_evicted=lambda: self.metrics.refused.labels("connections").inc())
            runner = web.AppRunner(server.app((listener.middleware,)), access_log=None,
                                   keepalive_timeout=self.config.header_timeout_s)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await listener.start(runner, self.config.listen_host, self.config.listen_port)
            stack.push_async_callback(listener.close)
            self.listener = listener
            log.info("peer_listening", node=self.node_id, host=self.config.listen_host, port=listener.port,
                     advertise=self.address, discovery=self.config.discovery, token=bool(self.config.token),
                     trusted_registries=list(self.config.trusted_registries))
            discovery = make_discovery(self.config, self.node_id, self.address)
            if discovery is not None:
                stack.push_async_callback(discovery.close)
            async with asyncio.TaskGroup() as group:
                if discovery is not None:
                    group.create_task(discovery.run(self.membership.set_candidates))
                group.create_task(self.membership.run())
                group.create_task(self._gauges(cache))
                group.create_task(keep_trimmed())
                if ready is not None:
                    ready.set()

    async def _gauges(self, cache: ChunkCache) -> None:
        assert self.membership is not None
        while True:
            self.metrics.cache_bytes.set(await asyncio.to_thread(cache.volume))
            self.metrics.members.set(len(self.membership.ring_members()))
            self.metrics.update_hit_ratio()
            await asyncio.sleep(self.config.health_interval_s)
