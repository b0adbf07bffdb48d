"""The node's chunk cache on local disk: content-addressed compressed frames, sha256-verified once on
the way in (by the fetcher), evicted under a size limit, shared by every image on the node.

A hit costs no hash and no SQLite write:
* a local reader's hit is decompressed only. Every peerpull frame carries zstd's content checksum
  (XXH64), which libzstd checks while decompressing, so a flipped byte on disk fails there and the
  entry is dropped as a miss. A stored frame without the checksum flag is sha256-checked instead.
* a frame served to a peer or counted by a warm-up is not decompressed at all: the receiver
  verifies what it gets (a corrupt frame costs it one fallback, never a wrong byte).
* eviction is diskcache's "least-recently-stored" (its `get` is a plain SELECT; LRU would write
  the access time on every hit). Recency lives in memory: hits note their digest, and the next
  store, which is the only moment diskcache evicts, first moves the noted entries to the front of
  the store order in the same transaction. So the hot set survives culls, and the write is batched
  on the store thread, off every reader's path.

diskcache does the storage (SQLite index + files, safe across threads and processes, survives
restarts); every call goes through a worker thread so the event loop never blocks on disk.
An in-memory index of the digests present lets a miss skip the disk (and its lock) entirely:
a cold read's latency is network and verification only. The index is filled from disk in a
background thread its owner starts (`start_index`, in PeerNode.run); until it is complete,
every lookup asks the disk.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from collections.abc import Sequence

import diskcache
import structlog
import zstandard

from converter.format.errors import FormatError
from converter.format.layer_reader import decompress_chunk
from converter.format.toc import check_frame_size
from peer.chunk import ChunkRef
from peer.summary import DigestFilter

log = structlog.get_logger(__name__)
MAX_TOUCHED = 8192  # hits remembered between two stores; more are not refreshed (they only age)


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor: a zstd context costs more to set up (~12 us) than a small
    frame takes to decompress (~3 us); instances must not be shared between threads."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def decompress_stored(frame: bytes, ref: ChunkRef) -> bytes:
    """A frame this node verified when it came in: decompress, with zstd's checksum as the disk check."""
    try:
        has_checksum = zstandard.get_frame_parameters(frame).has_checksum
    except zstandard.ZstdError as exc:
        raise FormatError(f"chunk {ref.digest}: stored frame header unreadable: {exc}") from None
    if not has_checksum:  # no cheap check for this one: the full one
        return decompress_chunk(frame, ref.as_chunk()._replace(compressed_length=len(frame)))
    check_frame_size(frame, ref.length, f"chunk {ref.digest}")
    try:
        data = _decompressor().decompress(frame, max_output_size=ref.length)
    except zstandard.ZstdError as exc:
        raise FormatError(f"chunk {ref.digest}: stored frame does not decompress: {exc}") from None
    if len(data) != ref.length:
        raise FormatError(f"chunk {ref.digest}: stored frame holds {len(data)} bytes, expected {ref.length}")
    return data


class FrameFile:
    """A stored frame in a file of its own (diskcache keeps values of 32 KiB and more so), open
    before anything could evict it: the bytes stay readable until it is closed."""

    def __init__(self, file: io.FileIO) -> None:
        self.file = file
        self.size = os.fstat(file.fileno()).st_size

    @classmethod
    def open(cls, path: str) -> FrameFile:
        return cls(io.FileIO(path, "r"))

    def __len__(self) -> int:
        return self.size

    def read(self) -> bytes:
        """The whole frame (when it is not sent with sendfile)."""
        return os.pread(self.file.fileno(), self.size, 0)

    def close(self) -> None:
        self.file.close()


class ChunkCache:
    def __init__(self, directory: str, max_bytes: int) -> None:
        self._cache = diskcache.Cache(directory, size_limit=max_bytes, eviction_policy="least-recently-stored",
                                      cull_limit=4, statistics=False)  # evict a few per insert: never the hot set
        self.directory = directory
        self._known: set[str] = set()  # digests stored (may hold a few evicted ones: those just miss)
        self._staged: dict[str, bytes] = {}  # verified frames on their way to disk: already served
        self._touched: set[str] = set()  # hit since the last store: refreshed in the store order then
        self._refresh_failed = False
        self._indexed = False
        self._indexer: threading.Thread | None = None
        self.holdings = DigestFilter()  # what peers are told this node holds (/v1/summary)

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
        for key in keys:
            self.holdings.add(key)
        self._indexed = True

    def might_have(self, digest: str) -> bool:
        """False only when the chunk is certainly not in the cache."""
        return not self._indexed or digest in self._known or digest in self._staged

    def known(self, digest: str) -> bool:
        """Stored or staged as far as this process knows, without asking the disk (an entry evicted
        since may linger here: a read then finds it missing and fetches it)."""
        return digest in self._staged or digest in self._known

    def stage(self, ref: ChunkRef, frame: bytes) -> None:
        """A verified frame about to be stored (store_verified): lookups find it already."""
        self._staged[ref.digest] = frame
        self.holdings.add(ref.digest)

    def unstage(self, ref: ChunkRef) -> None:
        """A staged frame that will not be stored after all (its write was abandoned)."""
        self._staged.pop(ref.digest, None)

    def close(self) -> None:
        self._cache.close()

    def _frame(self, ref: ChunkRef) -> bytes | None:
        frame = self._staged.get(ref.digest)
        if frame is None:
            frame = self._cache.get(ref.digest)
            if frame is None:
                self._known.discard(ref.digest)
                return None
            if len(self._touched) < MAX_TOUCHED:
                self._touched.add(ref.digest)
        return frame

    def _drop(self, ref: ChunkRef) -> None:
        log.warning("cache_entry_corrupt", digest=ref.digest)
        self._cache.delete(ref.digest)
        self._known.discard(ref.digest)

    def _load(self, ref: ChunkRef) -> tuple[bytes, bytes] | None:
        frame = self._frame(ref)
        if frame is None:
            return None
        try:
            data = decompress_stored(frame, ref)
        except FormatError:  # disk corruption: drop it and call it a miss
            self._drop(ref)
            return None
        return frame, data

    def load_frames(self, refs: list[ChunkRef], files: bool = False) -> list[bytes | FrameFile | None]:
        """Stored frames as they are, not decompressed (for peers, which verify what they get), in
        the calling (worker) thread: one hop and one SQLite query for a batch (a `get` per frame
        costs more than sending an 11 KB frame). With `files`, a frame diskcache keeps in a file of
        its own comes as a FrameFile, to be sent with sendfile (the caller closes it)."""
        frames: list[bytes | FrameFile | None] = [self._staged.get(ref.digest) for ref in refs]
        wanted = {ref.digest: i for i, ref in enumerate(refs) if frames[i] is None}
        if not wanted:
            return frames
        try:
            found = self._select(list(wanted), files)
        except Exception as exc:  # diskcache's private table changed shape: one `get` per frame
            log.warning("cache_batch_read_failed", error=f"{type(exc).__name__}: {exc}")
            return [frame if frame is not None else self._frame(ref) for frame, ref in zip(frames, refs)]
        for digest, i in wanted.items():
            frame = found.get(digest)
            if frame is None:
                self._known.discard(digest)
            elif len(self._touched) < MAX_TOUCHED:
                self._touched.add(digest)
            frames[i] = frame
        return frames

    def _select(self, digests: list[str], files: bool) -> dict[str, bytes | FrameFile]:
        """digest → stored frame for the ones present, read with one query of diskcache's own table
        (`raw = 1`: our keys are str, stored as they are; values are bytes, inline or in a file).
        The cheap disk check here is the size diskcache recorded; the receiver checks the digest."""
        marks = ",".join("?" * len(digests))
        rows = self._cache._sql(f"SELECT key, mode, filename, value, size FROM Cache WHERE raw = 1 AND key IN ({marks})",
                                digests).fetchall()
        disk = self._cache.disk
        found: dict[str, bytes | FrameFile] = {}
        for key, mode, filename, value, size in rows:
            frame: bytes | FrameFile
            try:
                if files and mode == diskcache.core.MODE_BINARY and filename:
                    frame = FrameFile.open(os.path.join(self.directory, filename))
                else:
                    frame = disk.fetch(mode, filename, value, False)
            except OSError:  # evicted between the query and the read: a miss
                continue
            if not isinstance(frame, (bytes, FrameFile)):
                continue
            if filename and len(frame) != size:  # a file truncated or overwritten: never served
                # (diskcache records the size of values in files only; inline ones are SQLite's to check)
                if isinstance(frame, FrameFile):
                    frame.close()
                log.warning("cache_entry_corrupt", digest=key, stored=len(frame), recorded=size)
                self._cache.delete(key)
                self._known.discard(key)
                continue
            found[key] = frame
        return found

    async def load(self, ref: ChunkRef) -> tuple[bytes, bytes] | None:
        """(compressed frame, uncompressed bytes) of `ref`, or None on a miss."""
        if not self.might_have(ref.digest):
            return None
        return await asyncio.to_thread(self._load, ref)

    async def load_frame(self, ref: ChunkRef) -> bytes | None:
        if not self.might_have(ref.digest):
            return None
        return await asyncio.to_thread(self._frame, ref)

    async def contains(self, digest: str) -> bool:
        if digest in self._staged:
            return True
        if not self.might_have(digest):
            return False
        return await asyncio.to_thread(self._cache.__contains__, digest)

    def store_verified(self, ref: ChunkRef, frame: bytes) -> None:
        """Store a frame whose content the caller has already verified (blocking: call from a worker thread)."""
        failed = self.store_batch([(ref, frame)])
        if failed:
            raise failed[0][1]

    def store_batch(self, frames: Sequence[tuple[ChunkRef, bytes]]) -> list[tuple[ChunkRef, Exception]]:
        """Store verified frames in one transaction (blocking: a worker thread); the ones not stored.

        One SQLite commit for the batch: a streamed image stores at the disk's rate, not at one
        transaction per frame. A failed batch is retried frame by frame, so one frame that cannot be
        stored does not lose the others.
        """
        try:
            try:
                self._write(frames)
            except Exception as exc:
                if len(frames) == 1:
                    return [(frames[0][0], exc)]
                failed = []
                for one in frames:
                    try:
                        self._write([one])
                    except Exception as exc:  # noqa: PERF203 (the rare path: a broken batch)
                        failed.append((one[0], exc))
                return failed
            return []
        finally:
            for ref, _ in frames:
                self._staged.pop(ref.digest, None)

    def _write(self, frames: Sequence[tuple[ChunkRef, bytes]]) -> None:
        with self._cache.transact(retry=True):
            self._refresh()
            for ref, frame in frames:
                self._cache.set(ref.digest, frame, retry=True)
        for ref, _ in frames:
            self._known.add(ref.digest)
            self.holdings.add(ref.digest)

    def _refresh(self) -> None:
        """Move the entries hit since the last store to the front of the store order (inside the
        store's transaction: this insert may cull, and must not cull the hot set)."""
        if not self._touched or self._refresh_failed:
            return
        touched, self._touched = self._touched, set()
        now = time.time()
        try:  # diskcache's own table; its API has no "touch the store time"
            self._cache._con.executemany("UPDATE Cache SET store_time = ? WHERE key = ? AND raw = 1",
                                         [(now, digest) for digest in touched])
        except Exception as exc:  # eviction then ages hot entries too; nothing else is lost
            self._refresh_failed = True
            log.warning("cache_recency_refresh_failed", error=str(exc))

    async def put_verified(self, ref: ChunkRef, frame: bytes) -> None:
        await asyncio.to_thread(self.store_verified, ref, frame)

    def volume(self) -> int:
        return int(self._cache.volume())

    def count(self) -> int:
        return len(self._cache)
