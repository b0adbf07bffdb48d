"""The object store: complete files, decompressed and verified, kept once on a plain filesystem so
FUSE passthrough can hand their reads to the kernel.

A file is written to a temp name in the store, its size checked, fsynced and renamed into place
(then the directory is fsynced): a name in the store is always a whole file. Concurrent
`materialise` calls for one key share one write. Files a container has open in passthrough are
pinned; eviction (oldest use first) never removes a pinned file and calls `before_evict(key)`
first, so the owner can close the backing id that points at it. On start the store scans its
directory: temp files and names it did not write are removed, the rest is kept.

The kernel refuses a passthrough backing file on overlayfs or FUSE (ELOOP), so a root on either
is refused at start-up with one line.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, Callable, Iterable
from pathlib import Path

import structlog

from converter.format.errors import ConfigError, FailedPreconditionError, FormatError, NotFoundError
from peer.singleflight import SingleFlight

log = structlog.get_logger(__name__)

OVERLAYFS_SUPER_MAGIC = 0x794C7630
FUSE_SUPER_MAGIC = 0x65735546
_REFUSED_FS = {OVERLAYFS_SUPER_MAGIC: "overlayfs", FUSE_SUPER_MAGIC: "FUSE"}
_KEY = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"


class ObjectTooLargeError(FailedPreconditionError):
    """The file is larger than the whole store: it stays served through FUSE."""


def object_key(size: int, chunk_digests: Iterable[str]) -> str:
    """The stable key of a file: the sha256 of its size and its chunks' digests, in order (two layers
    holding the same file share one object)."""
    h = hashlib.sha256(f"{size}\n".encode())
    for digest in chunk_digests:
        h.update(digest.encode() + b"\n")
    return h.hexdigest()


def filesystem_magic(path: Path) -> int:
    """statfs(2)'s f_type of the filesystem holding `path` (os.statvfs does not report it)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux; f_type comes first
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def check_plain_filesystem(path: Path) -> None:
    """ConfigError if `path` is on a filesystem the kernel refuses as a passthrough backing store."""
    kind = _REFUSED_FS.get(filesystem_magic(path))
    if kind is not None:
        raise ConfigError(f"object store {path} is on {kind}, which FUSE passthrough cannot use as backing files "
                          "(give a directory on a plain filesystem: snapshotter.object_store_dir)")


class ObjectStore:
    """Complete files by key under `root`, at most `limit_bytes` of them (pinned files excepted)."""

    def __init__(self, root: Path, limit_bytes: int,
                 before_evict: Callable[[str], None] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        check_plain_filesystem(root)
        self.root = root
        self.limit_bytes = limit_bytes
        self.before_evict = before_evict  # the owner of backing ids (passthrough.py) sets it
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        self._writes: SingleFlight[Path] = SingleFlight()
        self._scan()

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def keys(self) -> list[str]:
        """Every complete object, least recently used first."""
        return list(self._sizes)

    def path(self, key: str) -> Path | None:
        """The file of `key` if it is complete in the store (counts as a use)."""
        if key not in self._sizes:
            return None
        self._sizes.move_to_end(key)
        return self.root / key

    def pin(self, key: str) -> Path:
        """An open in passthrough: the file is not evicted until the matching `unpin`."""
        path = self.path(key)
        if path is None:
            raise NotFoundError(f"object {key} is not in the store")
        self._pins[key] = self._pins.get(key, 0) + 1
        try:
            os.utime(path)  # the use order survives a restart (the scan sorts by mtime)
        except OSError:
            pass
        return path

    def unpin(self, key: str) -> None:
        count = self._pins.get(key, 0)
        if count == 0:
            raise FailedPreconditionError(f"object {key} is not pinned")
        if count == 1:
            del self._pins[key]
        else:
            self._pins[key] = count - 1

    def pinned(self, key: str) -> int:
        return self._pins.get(key, 0)

    async def materialise(self, key: str, size: int, pieces: AsyncIterable[bytes]) -> Path:
        """The complete file of `key`, written from `pieces` (verified bytes, in order) unless it is
        already here. A caller that joins a write in progress does not consume its own `pieces`."""
        _check_key(key)
        existing = self.path(key)
        if existing is not None:
            return existing
        if size > self.limit_bytes:
            raise ObjectTooLargeError(f"a file of {size} bytes does not fit the object store "
                                      f"(snapshotter.object_store_bytes = {self.limit_bytes})")
        return await self._writes.do(key, lambda: self._write(key, size, pieces))

    def evict_to(self, limit_bytes: int) -> list[str]:
        """Remove unpinned objects, least recently used first, until at most `limit_bytes` are kept;
        the keys removed."""
        removed: list[str] = []
        used = self.used_bytes
        for key in list(self._sizes):
            if used <= limit_bytes:
                break
            if self._pins.get(key):
                continue
            if self.before_evict is not None:
                try:
                    self.before_evict(key)
                except Exception as exc:  # keep the file rather than evict it under a live backing id
                    log.warning("object_evict_hook_failed", key=key, error=f"{type(exc).__name__}: {exc}")
                    continue
            size = self._sizes.pop(key)
            (self.root / key).unlink(missing_ok=True)
            used -= size
            removed.append(key)
            log.debug("object_evicted", key=key, bytes=size)
        if used > limit_bytes:
            log.info("object_store_over_limit", used_bytes=used, limit_bytes=limit_bytes, pinned=len(self._pins),
                     reason="the rest is pinned by open files")
        return removed

    async def close(self) -> None:
        """Stop writes in progress (their temp files are removed)."""
        await self._writes.close()

    async def _write(self, key: str, size: int, pieces: AsyncIterable[bytes]) -> Path:
        self.evict_to(self.limit_bytes - size)  # make room before writing, not after
        tmp = self.root / f"{_TMP_PREFIX}{key}-{os.getpid()}-{time.monotonic_ns()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            written = 0
            async for piece in pieces:
                written += len(piece)
                if written > size:
                    raise FormatError(f"object {key}: more than the {size} bytes promised")
                await asyncio.to_thread(_write_all, fd, piece)
            if written != size:
                raise FormatError(f"object {key}: {written} bytes written, {size} promised")
            await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        final = self.root / key
        os.rename(tmp, final)
        await asyncio.to_thread(_fsync_dir, self.root)
        self._sizes[key] = size
        log.debug("object_materialised", key=key, bytes=size)
        return final

    def _scan(self) -> None:
        """Keep the complete objects found under the root (oldest use first); remove the rest."""
        found: list[tuple[float, str, int]] = []
        dropped = 0
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False) and _KEY.fullmatch(entry.name):
                st = entry.stat(follow_symlinks=False)
                found.append((st.st_mtime, entry.name, st.st_size))
                continue
            dropped += 1
            if entry.is_dir(follow_symlinks=False):
                log.warning("object_store_unknown_dir", path=entry.path, reason="left alone: not written by the store")
                continue
            os.unlink(entry.path)
        for _, key, size in sorted(found):
            self._sizes[key] = size
        log.info("object_store_opened", root=str(self.root), objects=len(found), bytes=self.used_bytes,
                 limit_bytes=self.limit_bytes, dropped=dropped)


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        raise ConfigError(f"object key {key!r} is not 64 lowercase hex digits (see object_key)")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_root(snapshotter_root: str, object_store_dir: str) -> Path:
    """Where the object store lives: `object_store_dir`, or `objects` under the snapshotter root."""
    return Path(object_store_dir) if object_store_dir else Path(snapshotter_root) / "objects"
