"""FUSE passthrough for complete files: which files the kernel reads itself, and the backing ids
that let it.

`Passthrough` (one per daemon) decides. A regular file of at least `min_bytes` (small files gain
nothing: their reads are a few requests) whose every chunk is verified in the node's cache is
written once, decompressed and verified, into the object store; from then on an OPEN of it is
answered FOPEN_PASSTHROUGH with a backing id, and its reads never reach the daemon. A file is
materialised when an open finds it complete, and when a read reaches the end of a file that is
now complete (a sequential reader fetched the rest ahead): the next open is native. An open never
waits for the download or the copy (see docs/snapshotter.md, "Passthrough", for why).

`OpenFiles` (one per FUSE connection) tracks the open handles per inode: how many, the backing id
they share and the store object it points at. The kernel ties a backing id to an inode's open
file: a second id for an inode that is still open makes its later opens fail with EIO, so one id
is reused while any open of the inode exists and closed with the last release; the object stays
pinned in the store (never evicted) until then. An inode already open through READ stays so until
its last close (the kernel refuses one inode open in passthrough and cached mode at once).
`export_state()`/`adopt_state()` carry the table to a successor serving the same connection.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from converter.format import toc as fmt
from converter.format.errors import FailedPreconditionError, FormatError, PeerpullError
from peer.chunk import ChunkRef
from peer.tasks import TaskSet
from snapshotter.fs.objects import ObjectStore, object_key

log = structlog.get_logger(__name__)

MATERIALISE_WINDOW = 4  # chunks read from the cache ahead of the copy into the store
MAX_ENDED = 4096  # inodes remembered as read to their end before complete (bounded: a scan of huge trees)


class ChunkGetter(Protocol):
    async def get(self, ref: ChunkRef) -> bytes: ...


class _Source(Protocol):
    def ref(self, chunk: fmt.Chunk) -> ChunkRef: ...


@dataclass(frozen=True, slots=True)
class Backing:
    """A complete local copy of a file: the store object `key` at `path` ("" for a test's own file)."""

    key: str
    path: Path


class Passthrough:
    """Decides which files are served by passthrough and materialises them into `store`.

    `known(digest)`: the chunk is verified in the node's cache (ChunkCache.known, no disk I/O);
    `chunks`: where verified chunk bytes come from (the fetcher: a cache hit on this path)."""

    def __init__(self, store: ObjectStore, known: Callable[[str], bool], chunks: ChunkGetter,
                 min_bytes: int) -> None:
        self.store = store
        store.before_evict = self.before_evict
        self._known = known
        self._chunks = chunks
        self.min_bytes = min_bytes
        # inode → (its chunk list, object key): the list itself is checked, so an inode number that a
        # later layer reuses (a slot given again) never maps to the old file's object
        self._keys: dict[int, tuple[list[fmt.Chunk], str]] = {}
        self._writing: set[str] = set()
        self._ended: set[int] = set()  # inodes read to their end while not yet complete
        self._tasks = TaskSet("passthrough")
        self.materialised = 0  # objects written by this process (tests, the benchmark)
        self.connections: weakref.WeakSet[OpenFiles] = weakref.WeakSet()  # whose backing ids point into the store

    def candidate(self, size: int, chunks: list[fmt.Chunk]) -> bool:
        """Large enough to gain, fits the store, and its chunks are its bytes in order (a backing
        file is exactly those)."""
        return self.min_bytes <= size <= self.store.limit_bytes and size > 0 and _contiguous(chunks, size)

    def _key(self, ino: int, size: int, chunks: list[fmt.Chunk]) -> str:
        known = self._keys.get(ino)
        if known is not None and known[0] is chunks:
            return known[1]
        key = object_key(size, (c.digest_hex for c in chunks))
        self._keys[ino] = (chunks, key)
        return key

    def complete(self, source: _Source, chunks: list[fmt.Chunk]) -> bool:
        """Every chunk of the file is verified in the node's cache."""
        return all(self._known(source.ref(c).digest) for c in chunks)

    def backing(self, source: _Source, ino: int, size: int, chunks: list[fmt.Chunk]) -> Backing | None:
        """The file's complete local copy for an OPEN; None: serve it through READ. A file complete in
        the cache but not yet in the store is materialised in the background for a later open."""
        if not self.candidate(size, chunks):
            return None
        key = self._key(ino, size, chunks)
        path = self.store.path(key)
        if path is not None:
            return Backing(key, path)
        self.materialise_later(source, ino, size, chunks, "open")
        return None

    def read_done(self, source: _Source, ino: int, size: int, chunks: list[fmt.Chunk], at_end: bool) -> None:
        """A read was answered. Once a reader got to the file's end and the file is complete, its next
        open is native. The kernel's readahead sends READs in parallel, so the last one can be answered
        while earlier chunks are still on the wire: the end is remembered and later reads check again."""
        if not at_end and ino not in self._ended:
            return
        if not self.candidate(size, chunks) or self.store.path(self._key(ino, size, chunks)) is not None:
            self._ended.discard(ino)
            return
        if self.complete(source, chunks):
            self._ended.discard(ino)
            self.materialise_later(source, ino, size, chunks, "end_of_file")
        elif len(self._ended) < MAX_ENDED:
            self._ended.add(ino)

    def materialise_later(self, source: _Source, ino: int, size: int, chunks: list[fmt.Chunk], why: str) -> None:
        key = self._key(ino, size, chunks)
        if key in self._writing or not self.complete(source, chunks):
            return
        self._writing.add(key)
        self._tasks.spawn(self._materialise(source, key, size, chunks, why), f"materialise {key[:12]}", quiet=True)

    async def materialise(self, source: _Source, ino: int, size: int, chunks: list[fmt.Chunk]) -> Path:
        """Write the file into the store now (from the cache, or fetched when a chunk is missing)."""
        return await self.store.materialise(self._key(ino, size, chunks), size, self._pieces(source, chunks))

    async def _materialise(self, source: _Source, key: str, size: int, chunks: list[fmt.Chunk], why: str) -> None:
        try:
            await self.store.materialise(key, size, self._pieces(source, chunks))
            self.materialised += 1
            log.info("passthrough_materialised", key=key, bytes=size, trigger=why)
        except PeerpullError as exc:  # the file stays served through READ
            log.warning("passthrough_materialise_failed", key=key, bytes=size, error=str(exc))
        except OSError as exc:
            log.warning("passthrough_materialise_failed", key=key, bytes=size, error=f"{exc.strerror}: {exc.filename}")
        finally:
            self._writing.discard(key)

    async def _pieces(self, source: _Source, chunks: list[fmt.Chunk]) -> AsyncIterator[bytes]:
        """The file's bytes in order: each chunk's piece cut out of its verified frame, a few frames
        loaded (and decompressed) ahead of the write."""
        pending: list[asyncio.Task[bytes]] = []
        try:
            for i, chunk in enumerate(chunks):
                while len(pending) < MATERIALISE_WINDOW and i + len(pending) < len(chunks):
                    pending.append(asyncio.ensure_future(self._chunks.get(source.ref(chunks[i + len(pending)]))))
                frame = await pending.pop(0)
                piece = frame[chunk.frame_offset:chunk.frame_offset + chunk.length]
                if len(piece) != chunk.length:
                    raise FormatError(f"chunk {chunk.digest_hex}: frame too short for the file's piece")
                yield piece
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def before_evict(self, key: str) -> None:
        """The store's hook: refuse while a backing id points at the object (its pin keeps it anyway);
        else forget the inodes of the object about to go (a later open decides anew)."""
        if any(files.holds(key) for files in self.connections):
            raise FailedPreconditionError(f"object {key} backs a file open in passthrough")
        for files in self.connections:
            files.drop(key)
        for ino in [ino for ino, (_, k) in self._keys.items() if k == key]:
            del self._keys[ino]

    async def close(self) -> None:
        await self._tasks.close()
        await self.store.close()


def _contiguous(chunks: list[fmt.Chunk], size: int) -> bool:
    """The chunks cover the file from 0 to `size` without a gap (a backing file is its bytes, in order)."""
    at = 0
    for c in chunks:
        if c.file_offset != at:
            return False
        at += c.length
    return at == size


@dataclass(slots=True)
class OpenFile:
    opens: int  # opens of the inode not yet released
    backing_id: int  # 0: served through READ
    key: str  # the store object pinned while open ("" none)


class OpenFiles:
    """The open files of one FUSE connection per inode and their backing ids.

    `register(fd)`/`unregister(id)` are the connection's FUSE_DEV_IOC_BACKING_OPEN/CLOSE (register
    None: passthrough was not negotiated, every open is served through READ); `store` pins the
    objects of open files."""

    def __init__(self, register: Callable[[int], int] | None, unregister: Callable[[int], None],
                 store: ObjectStore | None = None) -> None:
        self._register = register
        self._unregister = unregister
        self.store = store
        self.files: dict[int, OpenFile] = {}
        # called when a backing id is registered or closed: the fd holder must know every id before
        # an OPEN is answered with it, or a successor after a crash would register a second id
        # for an inode the kernel still holds open (every later open of it: EIO)
        self.on_change: Callable[[], None] | None = None

    @property
    def enabled(self) -> bool:
        return self._register is not None

    def open(self, ino: int, backing: Callable[[], Backing | None]) -> int:
        """One more open of `ino`; the backing id to answer it with (0: serve it through READ).
        `backing` is asked only at the inode's first open: that one decides until the last close."""
        opened = self.files.get(ino)
        registered = opened is None
        if opened is None:
            opened = self.files[ino] = self._first_open(ino, self._ask(ino, backing))
        elif opened.opens == 0 and opened.key:  # a kept id opened again: its object pinned again
            self._pin_again(ino, opened)
        opened.opens += 1
        if registered and opened.backing_id:
            self._changed()
        return opened.backing_id

    def _pin_again(self, ino: int, opened: OpenFile) -> None:
        if self.store is None:
            return
        try:
            self.store.pin(opened.key)
        except PeerpullError:  # evicted meanwhile: the kernel's reference keeps the file readable
            log.warning("object_pin_lost", key=opened.key, inode=ino, reason="evicted while its id was kept")
            opened.key = ""

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _ask(self, ino: int, backing: Callable[[], Backing | None]) -> Backing | None:
        if self._register is None:
            return None
        try:
            return backing()
        except Exception as exc:  # noqa: BLE001 - the open still works, through READ
            log.warning("fuse_backing_unavailable", inode=ino, error=f"{type(exc).__name__}: {exc}")
            return None

    def _first_open(self, ino: int, backing: Backing | None) -> OpenFile:
        if backing is None or self._register is None:
            return OpenFile(0, 0, "")
        if backing.key and self.store is not None:
            try:
                self.store.pin(backing.key)  # before the fd: an eviction cannot slip in between
            except PeerpullError:
                return OpenFile(0, 0, "")  # evicted since it was found: served through READ
        try:
            fd = os.open(backing.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._unpin(backing.key)
            log.warning("fuse_backing_unavailable", inode=ino, path=str(backing.path), error=exc.strerror)
            return OpenFile(0, 0, "")
        try:
            backing_id = self._register(fd)
        except PeerpullError as exc:
            self._unpin(backing.key)
            log.warning("fuse_backing_unavailable", inode=ino, path=str(backing.path), error=str(exc))
            return OpenFile(0, 0, "")
        finally:
            os.close(fd)  # the kernel keeps its own reference
        return OpenFile(0, backing_id, backing.key)

    def release(self, ino: int) -> None:
        """One open of `ino` ended. After the last one its object is unpinned (evictable), but its
        backing id stays registered for later opens: the id of an inode never changes while the
        kernel may still hold a file of it, and is closed only before its object is evicted."""
        opened = self.files.get(ino)
        if opened is None or opened.opens <= 0:
            return
        opened.opens -= 1
        if opened.opens > 0:
            return
        if not opened.backing_id:
            del self.files[ino]
            return
        self._unpin(opened.key)

    def holds(self, key: str) -> bool:
        """A file open in passthrough is backed by the object `key`."""
        return any(f.key == key and f.backing_id and f.opens > 0 for f in self.files.values())

    def drop(self, key: str) -> None:
        """Close the kept backing ids of the object `key` (about to be evicted; none is open)."""
        gone = [ino for ino, f in self.files.items() if f.key == key and f.backing_id and f.opens == 0]
        for ino in gone:
            backing_id = self.files.pop(ino).backing_id
            try:
                self._unregister(backing_id)
            except PeerpullError as exc:
                log.warning("fuse_backing_close_failed", backing_id=backing_id, error=str(exc))
        if gone:
            self._changed()

    def handles(self) -> dict[int, tuple[int, int]]:
        """Per open inode: (opens not yet released, backing id or 0)."""
        return {ino: (f.opens, f.backing_id) for ino, f in self.files.items() if f.opens > 0}

    def _unpin(self, key: str) -> None:
        if key and self.store is not None:
            try:
                self.store.unpin(key)
            except FailedPreconditionError as exc:  # adopted without its pin: nothing to give back
                log.warning("object_unpin_failed", key=key, error=str(exc))

    # ---- a successor on the same connection ---------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """The table as plain data (JSON): what a successor needs to keep answering opens and releases."""
        return {"files": [[ino, f.opens, f.backing_id, f.key] for ino, f in sorted(self.files.items())]}

    def adopt_state(self, state: dict[str, Any]) -> None:
        """Take over a predecessor's table: its backing ids stay valid on the connection and are
        reused by later opens; their objects are pinned again in this process's store."""
        for ino, opens, backing_id, key in state.get("files", []):
            if int(opens) <= 0 and not int(backing_id):
                continue
            self.files[int(ino)] = OpenFile(max(int(opens), 0), int(backing_id), str(key))
            if key and int(opens) > 0 and self.store is not None:
                try:
                    self.store.pin(str(key))
                except PeerpullError:  # gone from the store: the kernel still holds the open file
                    log.warning("object_pin_lost", key=key, inode=ino, reason="not in this process's store")
                    self.files[int(ino)].key = ""




def announce(transport: object, passthrough: Passthrough | None) -> Passthrough | None:
    """Log whether opens will be answered with passthrough on this transport (`fuse_passthrough`);
    the Passthrough to keep, None when the transport cannot use it (nothing is materialised then)."""
    session = getattr(transport, "session", None)  # the kernel transport's KernelSession
    backend = getattr(transport, "backend", "?")
    if passthrough is None:
        log.info("fuse_passthrough", enabled=False, backend=backend, reason="no object store")
        return None
    if session is None:
        log.info("fuse_passthrough", enabled=False, backend=backend,
                 reason="pyfuse3 (libfuse) cannot answer an open with a backing id: every read goes through the daemon")
        return None
    if not session.passthrough:
        log.info("fuse_passthrough", enabled=False, backend=backend,
                 reason="the kernel did not offer FUSE_PASSTHROUGH at INIT (kernel 6.9+)")
        return None
    log.info("fuse_passthrough", enabled=True, backend=backend, min_bytes=passthrough.min_bytes,
             store=str(passthrough.store.root), store_limit_bytes=passthrough.store.limit_bytes)
    return passthrough
