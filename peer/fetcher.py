"""The chunk fetcher: local cache → peers (holders, then up the chunk's fan-out tree) → origin registry.

A chunk is decompressed and checked against its sha256 exactly once, when it enters the node
(from a peer or the origin), before it is cached, served or returned. Later hits trust the cache
(see peer/cache.py for its cheap disk check); `fetch_frame` and `ensure` serve peers and warm-ups
without decompressing at all. Concurrent requests for one digest share one fetch, whoever asked
(a local reader, a prefetch, or another node).

A fetch on another node's behalf asks only this node's ancestors in the chunk's tree (peer/ring.py:
ranked above it, so requests climb and never come back), then the origin. A local fetch may ask a
holder ranked below this node; while it does, a peer's request for that chunk does not join it
(the holder might be asking us) but climbs on its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import structlog

from converter.format.errors import PeerpullError
from converter.format.layer_reader import decompress_chunk
from peer.cache import ChunkCache
from peer.cache_writer import CacheWriter
from peer.chunk import ChunkRef
from peer.client import PeerClient
from peer.membership import Member, Membership
from peer.metrics import PeerMetrics
from peer.singleflight import SingleFlight
from peer.sources import PeerSources, SourceExhausted

log = structlog.get_logger(__name__)
STORE_BATCH_BYTES = 8 << 20  # frames written to the disk cache in one transaction, at most
# background (prefetch, warm-up) verification in parallel: zstd and hashlib release the GIL; one core
# is left to on-demand reads, which verify in the loop's default executor, never behind these
BACKGROUND_VERIFIERS = max(1, min(4, (os.cpu_count() or 2) - 1))
BACKGROUND_NICE = 10  # background verify and disk writes yield the CPU to the containers and the FUSE loop


def _lower_priority() -> None:
    """Run this worker thread at a lower CPU priority (Linux: a thread's own nice value). A cold
    start's stream verifies and stores hundreds of MB while the container's own start (an import
    on the same cores) is what the node waits for."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except OSError:  # not permitted or not per-thread here: the default priority, nothing else changes
        pass


class FrameSource(Protocol):
    async def fetch_frame(self, ref: ChunkRef, background: bool = False) -> bytes: ...


@dataclass(frozen=True)
class Fetched:
    frame: bytes  # compressed, as stored and as sent to peers
    data: bytes  # uncompressed, verified
    tier: str  # cache, peer or origin


class ChunkFetcher:
    def __init__(self, cache: ChunkCache, origin: FrameSource, metrics: PeerMetrics,
                 membership: Membership | None = None, peers: PeerClient | None = None,
                 pending_store_bytes: int = 16 << 20, hedge_after_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cache = cache
        self._origin = origin
        self._metrics = metrics
        self._membership = membership
        self._peers = peers
        self._flights: SingleFlight[Fetched] = SingleFlight()
        self._sources: PeerSources[tuple[bytes, bytes, str]] | None = None
        if membership is not None and peers is not None:
            self._sources = PeerSources(membership, hedge_after_s, clock, on_failure=self._peer_failed)
        self._below: set[str] = set()  # digests a local fetch asks a holder ranked below this node for
        # background fetches verify on their own thread: they must not queue ahead of on-demand reads
        # in the default executor
        self._background_pool = ThreadPoolExecutor(max_workers=BACKGROUND_VERIFIERS, initializer=_lower_priority,
                                                   thread_name_prefix="prefetch-verify")
        # writing to the disk cache is off the reader's path: a reader waits for the verified bytes only
        self._store_pool = ThreadPoolExecutor(max_workers=1, initializer=_lower_priority,
                                              thread_name_prefix="cache-store")
        self.writer = CacheWriter(cache, self._store_pool, metrics, pending_store_bytes, STORE_BATCH_BYTES)

    async def get(self, ref: ChunkRef) -> bytes:
        """The verified bytes of a chunk, from the cheapest tier that has it (a local reader).

        Concurrent gets of one digest share one flight that covers the cache tier too: the kernel
        asks for a chunk in several pieces at once, and they cost one disk read and decompression
        (or one remote fetch, which requests from peers and prefetches join as well).
        """
        return (await self._flights.do(ref.digest, lambda: self._get(ref))).data

    def cached(self, digest: str) -> bool:
        """The chunk is in this node's cache as far as its in-memory index knows (no disk read)."""
        return self._cache.known(digest)

    def loading(self, digest: str) -> bool:
        """A fetch of `digest` is under way (a read-ahead need not start another)."""
        return self._flights.inflight(digest)

    async def _get(self, ref: ChunkRef) -> Fetched:
        started = time.monotonic()
        loaded = await self._cache_load(ref)
        if loaded is not None:
            return self._count(loaded, started)
        return await self._fetch_remote(ref, use_peers=True)

    async def fetch(self, ref: ChunkRef, use_peers: bool, background: bool = False) -> Fetched:
        """`use_peers=False` for requests that came from a peer: cache, then origin, never another hop.

        `background` (prefetch): the origin serves it after on-demand reads. An on-demand read does
        not wait behind a background fetch of the same chunk: it queues its own, which the origin
        merges with the queued one.
        """
        started = time.monotonic()
        loaded = await self._cache_load(ref)
        if loaded is not None:
            return self._count(loaded, started)
        return await self._remote(ref, use_peers, background)

    async def fetch_frame(self, ref: ChunkRef, use_peers: bool, background: bool = False) -> tuple[bytes, str]:
        """(compressed frame, tier): a cache hit is sent as stored, neither decompressed nor hashed
        (for peers: they verify what they receive)."""
        started = time.monotonic()
        frame = await self._cache.load_frame(ref)
        if frame is not None:
            self._count_tier("cache", ref.length, 0, started)
            return frame, "cache"
        fetched = await self._remote(ref, use_peers, background)
        return fetched.frame, fetched.tier

    async def ensure(self, ref: ChunkRef, use_peers: bool = True, background: bool = True) -> str:
        """Make sure the chunk is in this node (warm-up); the tier it came from. A chunk already
        here is not read at all."""
        started = time.monotonic()
        if await self._cache.contains(ref.digest):
            self._count_tier("cache", ref.length, 0, started)
            return "cache"
        return (await self._remote(ref, use_peers, background)).tier

    def fetching(self, digest: str) -> bool:
        """Whether a fetch of the chunk is under way (requested, on the wire, or being verified):
        its frame is in the cache (staged) once that fetch ends, so nothing else need ask for it."""
        return self._flights.inflight(digest) or self._flights.inflight(f"bg:{digest}")

    async def _remote(self, ref: ChunkRef, use_peers: bool, background: bool) -> Fetched:
        if not use_peers and ref.digest in self._below:  # climb on our own: the holder may be asking us
            return await self._flights.do(f"up:{ref.digest}", lambda: self._fetch_remote(ref, False, background))
        if not use_peers and self._flights.inflight(f"bg:{ref.digest}"):
            # a peer's request joins our own stream's fetch of the chunk: asking again would bring it twice
            return await self._flights.do(f"bg:{ref.digest}", lambda: self._fetch_remote(ref, False, True))
        if background and self._flights.inflight(ref.digest):
            return await self._flights.do(ref.digest, lambda: self._fetch_remote(ref, use_peers, False))
        key = f"bg:{ref.digest}" if background else ref.digest
        return await self._flights.do(key, lambda: self._fetch_remote(ref, use_peers, background))

    async def _cache_load(self, ref: ChunkRef) -> Fetched | None:
        loaded = await self._cache.load(ref)
        return Fetched(loaded[0], loaded[1], "cache") if loaded else None

    def _count(self, fetched: Fetched, started: float) -> Fetched:
        self._count_tier(fetched.tier, len(fetched.data), len(fetched.frame), started)
        return fetched

    def _count_tier(self, tier: str, length: int, wire: int, started: float) -> None:
        self._metrics.requests.labels(tier).inc()
        self._metrics.bytes.labels(tier).inc(length)
        if tier != "cache":
            self._metrics.wire_bytes.labels(tier).inc(wire)
        self._metrics.latency.labels(tier).observe(time.monotonic() - started)

    @staticmethod
    def _decompress_verified(ref: ChunkRef, frame: bytes) -> bytes:
        return decompress_chunk(frame, ref.as_chunk()._replace(compressed_length=len(frame)))

    async def _verify(self, ref: ChunkRef, frame: bytes, background: bool) -> bytes:
        """Decompress and check the digest in a worker thread, then queue the frame for the disk cache."""
        loop = asyncio.get_running_loop()
        if not background:
            data = await loop.run_in_executor(None, self._decompress_verified, ref, frame)
            await self.writer.put(ref, frame, wait=False)  # staged at once: readers find it
            return data
        # room first, then the chunk: a background fetch waiting for the disk holds its frame only
        await self.writer.admit(len(frame))
        try:
            data = await loop.run_in_executor(self._background_pool, self._decompress_verified, ref, frame)
        except BaseException:
            self.writer.release(len(frame))
            raise
        await self.writer.put(ref, frame, wait=False, admitted=len(frame))
        return data

    async def flush(self) -> None:
        """Wait until every fetched chunk is in the disk cache."""
        await self.writer.flush()

    async def cancel_fetches(self) -> None:
        """End every fetch still in flight (at shutdown, before the pools close)."""
        await self._flights.close()
        await self.writer.close()  # verified frames are not thrown away: they reach the disk first

    def close(self) -> None:
        self._store_pool.shutdown(wait=True)
        self._background_pool.shutdown(wait=True)

    async def _from_peer(self, member: Member, ref: ChunkRef, background: bool) -> tuple[bytes, bytes, str]:
        """(frame, verified bytes, the tier the peer had it from)."""
        assert self._peers is not None
        frame, tier = await self._peers.fetch_frame(member.address, ref)
        return frame, await self._verify(ref, frame, background), tier

    def _peer_failed(self, member: Member, ref: ChunkRef, reason: str, exc: Exception) -> None:
        self._metrics.errors.labels("peer", reason).inc()
        log.warning("chunk_fetch_failed", tier="peer", peer=member.node_id, digest=ref.digest,
                    reason=reason, error=str(exc))

    def _origin_has(self, ref: ChunkRef) -> bool:
        """A stream's Range run already brings the frame from the origin: no peer is asked for it."""
        busy = getattr(self._origin, "busy", None)
        return bool(busy is not None and busy(ref))

    async def _fetch_remote(self, ref: ChunkRef, use_peers: bool, background: bool = False) -> Fetched:
        started = time.monotonic()
        if self._sources is not None and self._membership is not None and not self._origin_has(ref):
            membership = self._membership

            def candidates() -> list[Member]:
                return membership.candidates_for(ref.digest) if use_peers else membership.upstream_for(ref.digest)

            members = candidates()
            below = use_peers and any(not self._membership.above(ref.digest, m) for m in members)
            if below:
                self._below.add(ref.digest)
            try:
                (frame, data, _tier), member = await self._sources.fetch(
                    ref, members, lambda m, r: self._from_peer(m, r, background), candidates)
            except SourceExhausted:
                pass
            else:
                log.debug("chunk_fetched", tier="peer", peer=member.node_id, digest=ref.digest, bytes=len(data))
                return self._count(Fetched(frame, data, "peer"), started)
            finally:
                if below:
                    self._below.discard(ref.digest)
        if self._cache.known(ref.digest):  # a stream's run brought it in since this read missed the cache
            loaded = await self._cache_load(ref)
            if loaded is not None:
                return self._count(loaded, started)
        try:
            frame = await self._origin.fetch_frame(ref, background)
            data = await self._verify(ref, frame, background)
        except PeerpullError as exc:
            self._metrics.errors.labels("origin", type(exc).__name__).inc()
            log.warning("chunk_fetch_failed", tier="origin", digest=ref.digest, error=str(exc))
            raise
        log.debug("chunk_fetched", tier="origin", digest=ref.digest, bytes=len(data))
        return self._count(Fetched(frame, data, "origin"), started)
