"""The node's chunk cache on local disk: content-addressed compressed frames, verified on the way in
and on the way out, LRU-evicted under a size limit, shared by every image on the node.

diskcache does the storage (SQLite index + files, safe across threads and processes, survives
restarts); every call goes through a worker thread so the event loop never blocks on disk.
An in-memory index of the digests present lets a miss skip the disk (and its lock) entirely:
a cold read's latency is network and verification only. The index is filled from disk in a
background thread its owner starts (`start_index`, in PeerNode.run); until it is complete,
every lookup asks the disk.
"""

from __future__ import annotations

import asyncio
import threading

import diskcache
import structlog

from converter.format.errors import FormatError
from converter.format.layer_reader import decompress_chunk
from peer.chunk import ChunkRef

log = structlog.get_logger(__name__)


class ChunkCache:
    def __init__(self, directory: str, max_bytes: int) -> None:
        self._cache = diskcache.Cache(directory, size_limit=max_bytes, eviction_policy="least-recently-used",
                                      cull_limit=4, statistics=False)  # evict a few per insert: never the hot set
        self.directory = directory
        self._known: set[str] = set()  # digests stored (may hold a few evicted ones: those just miss)
        self._staged: dict[str, bytes] = {}  # verified frames on their way to disk: already served
        self._indexed = False
        self._indexer: threading.Thread | None = None

    def start_index(self) -> None:
        """Fill the in-memory index from disk in a background thread (once).

        A daemon thread: close() does not wait for it; an index cut short by close is only unused.
        """
        if self._indexer is None:
            self._indexer = threading.Thread(target=self._index, name="cache-index", daemon=True)
            self._indexer.start()

    def _index(self) -> None:
        try:
            keys = set(self._cache.iterkeys())
        except Exception as exc:  # the cache is usable without the index: lookups go to disk
            log.warning("cache_index_failed", error=str(exc))
            return
        self._known |= keys
        self._indexed = True

    def might_have(self, digest: str) -> bool:
        """False only when the chunk is certainly not in the cache."""
        return not self._indexed or digest in self._known or digest in self._staged

    def stage(self, ref: ChunkRef, frame: bytes) -> None:
        """A verified frame about to be stored (store_verified): lookups find it already."""
        self._staged[ref.digest] = frame

    def staged(self, digest: str) -> bool:
        """A verified frame on its way to disk: a stream must not fetch it again."""
        return digest in self._staged

    def close(self) -> None:
        self._cache.close()

    def _load(self, ref: ChunkRef) -> tuple[bytes, bytes] | None:
        frame = self._staged.get(ref.digest)
        if frame is None:
            frame = self._cache.get(ref.digest)
        if frame is None:
            self._known.discard(ref.digest)
            return None
        try:
            data = decompress_chunk(frame, ref.as_chunk()._replace(compressed_length=len(frame)))
        except FormatError:  # disk corruption: drop it and call it a miss
            log.warning("cache_entry_corrupt", digest=ref.digest)
            self._cache.delete(ref.digest)
            self._known.discard(ref.digest)
            return None
        return frame, data

    def load_many(self, refs: list[ChunkRef]) -> list[tuple[bytes, bytes] | None]:
        """`load` for a batch, in the calling (worker) thread: one hop instead of one per chunk."""
        return [self._load(ref) for ref in refs]

    async def load(self, ref: ChunkRef) -> tuple[bytes, bytes] | None:
        """(compressed frame, verified uncompressed bytes) of `ref`, or None on a miss."""
        if not self.might_have(ref.digest):
            return None
        return await asyncio.to_thread(self._load, ref)

    async def contains(self, digest: str) -> bool:
        return await asyncio.to_thread(self._cache.__contains__, digest)

    def store_verified(self, ref: ChunkRef, frame: bytes) -> None:
        """Store a frame whose content the caller has already verified (blocking: call from a worker thread)."""
        try:
            self._cache.set(ref.digest, frame)
            self._known.add(ref.digest)
        finally:
            self._staged.pop(ref.digest, None)

    async def put_verified(self, ref: ChunkRef, frame: bytes) -> None:
        await asyncio.to_thread(self.store_verified, ref, frame)

    def volume(self) -> int:
        return int(self._cache.volume())

    def count(self) -> int:
        return len(self._cache)
