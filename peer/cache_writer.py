"""Verified frames written to the node's disk cache in batches, off every reader's path.

A frame is staged in the cache the moment it is verified (lookups and peers find it at once), then
queued here. One writer task takes everything queued so far as one batch, up to `batch_bytes`, and
stores it in one diskcache transaction on the store thread; frames verified meanwhile form the next
batch. So a lone on-demand fetch is written alone and at once, while a stream at the link's rate is
written in few large transactions instead of one SQLite commit per frame.

Memory is bounded: once `max_pending_bytes` wait to be written, `put` holds a background caller (the
disk is behind; a stream then stops asking the network for more), and `admit` holds a background
fetch before it decompresses its frame, so what waits for the disk is the compressed frame only,
never the chunk too; on-demand reads never wait here. Nothing is dropped
silently: a frame the cache cannot store is counted (`peerpull_chunk_errors{tier="cache"}`) and
logged as `cache_store_failed`; a later read fetches it again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Executor

import structlog

from peer.cache import ChunkCache
from peer.chunk import ChunkRef
from peer.metrics import PeerMetrics

log = structlog.get_logger(__name__)


class CacheWriter:
    def __init__(self, cache: ChunkCache, pool: Executor, metrics: PeerMetrics, max_pending_bytes: int,
                 batch_bytes: int) -> None:
        self._cache = cache
        self._pool = pool
        self._metrics = metrics
        self._max_pending = max_pending_bytes
        self._batch_bytes = batch_bytes
        self._queue: deque[tuple[ChunkRef, bytes]] = deque()
        self.pending_bytes = 0  # queued or being written: staged in the cache's memory until stored
        self.admitted_bytes = 0  # background frames let in (`admit`) and being verified, not yet queued
        self._task: asyncio.Task[None] | None = None
        self._room = asyncio.Event()  # set whenever pending_bytes is within the bound
        self._room.set()
        self.batches = 0
        self.failed = 0

    @property
    def held_bytes(self) -> int:
        """Frames this writer answers for: queued, being written, or admitted and being verified."""
        return self.pending_bytes + self.admitted_bytes

    async def admit(self, size: int) -> None:
        """Wait until a background frame of `size` bytes fits within the bound, and count it: called
        before it is decompressed, so a background fetch holds neither frame nor chunk while the
        disk catches up. One frame is always let in when nothing is held (a frame above the bound)."""
        while self.held_bytes and self.held_bytes + size > self._max_pending:
            self._room.clear()
            await self._room.wait()
        self.admitted_bytes += size

    def release(self, size: int) -> None:
        """An admitted frame that will not be queued (its verification failed)."""
        self.admitted_bytes -= size
        self._room.set()

    async def put(self, ref: ChunkRef, frame: bytes, wait: bool = True, admitted: int = 0) -> None:
        """Queue a verified frame (staged: readable at once); waits while the disk is too far behind,
        unless not `wait` (an on-demand read: never held behind a stream's backlog; FUSE's own
        concurrency bounds what those add). `admitted`: the bytes `admit` counted for it."""
        self._cache.stage(ref, frame)
        self._queue.append((ref, frame))
        self.admitted_bytes -= admitted
        self.pending_bytes += len(frame)
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="cache-writer")
        while wait and self.held_bytes > self._max_pending:
            self._room.clear()
            await self._room.wait()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch: list[tuple[ChunkRef, bytes]] = []
                size = 0
                while self._queue and (not batch or size + len(self._queue[0][1]) <= self._batch_bytes):
                    ref, frame = self._queue.popleft()
                    batch.append((ref, frame))
                    size += len(frame)
                try:
                    failed = await loop.run_in_executor(self._pool, self._cache.store_batch, batch)
                except Exception as broken:  # store_batch reports per frame; this is the pool itself failing
                    failed = [(ref, broken) for ref, _ in batch]
                self.batches += 1
                for ref, exc in failed:
                    self.failed += 1
                    self._metrics.errors.labels("cache", type(exc).__name__).inc()
                    log.warning("cache_store_failed", digest=ref.digest, error=str(exc) or type(exc).__name__)
                self.pending_bytes -= size
                if self.held_bytes <= self._max_pending:
                    self._room.set()
        finally:
            self._task = None
            if self._queue:  # cancelled (shutdown) with frames queued: the next read fetches them again
                log.warning("cache_store_dropped", frames=len(self._queue))
                self._metrics.errors.labels("cache", "dropped").inc(len(self._queue))
                for ref, _ in self._queue:
                    self._cache.unstage(ref)
                self._queue.clear()
                self.pending_bytes = 0
            self._room.set()

    async def flush(self) -> None:
        """Wait until every queued frame is in the disk cache (or reported as failed)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Write what is queued, then stop (at shutdown, before the store thread ends)."""
        await self.flush()
