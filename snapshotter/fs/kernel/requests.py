"""The read-only FUSE operations of the kernel session: each decodes one request's body, asks the
filesystem core, and returns the reply's parts (None: the operation has no reply), or raises
FsError for an errno reply (struct.error / ValueError: a malformed request, answered EIO).

Kept here per connection, because a successor needs them: the kernel's lookup count per inode
(LOOKUP and every READDIRPLUS entry add one, FORGET takes them back) and the open files per inode
with their passthrough backing ids.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable

import structlog

from snapshotter.fs.fusefs import Attr, LayerFS
from snapshotter.fs.guard import FsError
from snapshotter.fs.kernel import abi
from snapshotter.fs.kernel.abi import Op
from snapshotter.fs.passthrough import OpenFiles

log = structlog.get_logger(__name__)

Reply = list[bytes] | None
Handler = Callable[[int, memoryview], Reply]


def _valid(timeout_s: float) -> tuple[int, int]:
    whole = int(timeout_s)
    return whole, int((timeout_s - whole) * 1e9)


def attr_bytes(a: Attr) -> bytes:
    sec, nsec = divmod(a.time_ns, 1_000_000_000)
    return abi.ATTR.pack(a.ino, a.size, a.blocks, sec, sec, sec, nsec, nsec, nsec, a.mode, a.nlink, a.uid, a.gid,
                         a.rdev & 0xFFFFFFFF, a.blksize, 0)


def entry_bytes(a: Attr) -> bytes:
    entry_s, entry_ns = _valid(a.entry_timeout)
    attr_s, attr_ns = _valid(a.attr_timeout)
    return abi.ENTRY_OUT_HEAD.pack(a.ino, 0, entry_s, attr_s, entry_ns, attr_ns) + attr_bytes(a)


def _name(body: memoryview) -> bytes:
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise ValueError("name without its NUL")
    return raw[:end]


def _sized(size: int, value: bytes) -> list[bytes]:
    # size 0 asks how big the value is; a value larger than the caller's buffer is ERANGE
    if size == 0:
        return [abi.GETXATTR_OUT.pack(len(value), 0)]
    if len(value) > size:
        raise FsError(errno.ERANGE)
    return [value]


class Requests:
    """`table` maps opcodes to handlers over `fs`; `open_backing`/`close_backing` are the
    connection's passthrough ioctls (None: passthrough was not negotiated)."""

    def __init__(self, fs: LayerFS, open_backing: Callable[[int], int] | None,
                 close_backing: Callable[[int], None]) -> None:
        self.fs = fs
        self.lookups: dict[int, int] = {}
        # the open files per inode and their backing ids (passthrough.py)
        self.files = OpenFiles(open_backing, close_backing, fs.passthrough.store if fs.passthrough else None)
        if fs.passthrough is not None:
            fs.passthrough.connections.add(self.files)
        self.table: dict[int, Handler] = {
            Op.LOOKUP: self.lookup, Op.FORGET: self.forget, Op.BATCH_FORGET: self.batch_forget,
            Op.GETATTR: self.getattr, Op.READLINK: self.readlink, Op.OPEN: self.open, Op.RELEASE: self.release,
            Op.STATFS: self.statfs, Op.GETXATTR: self.getxattr, Op.LISTXATTR: self.listxattr,
            Op.OPENDIR: self.opendir, Op.READDIR: self.readdir, Op.READDIRPLUS: self.readdirplus,
            Op.RELEASEDIR: self.releasedir, Op.ACCESS: self.access,
        }

    # ---- names and attributes -----------------------------------------------------------------

    def lookup(self, nodeid: int, body: memoryview) -> Reply:
        attr = self.fs.lookup(nodeid, _name(body))
        self.lookups[attr.ino] = self.lookups.get(attr.ino, 0) + 1
        return [entry_bytes(attr)]

    def _forget_one(self, nodeid: int, count: int) -> None:
        left = self.lookups.get(nodeid, 0) - count
        if left > 0:
            self.lookups[nodeid] = left
        else:
            self.lookups.pop(nodeid, None)

    def forget(self, nodeid: int, body: memoryview) -> Reply:
        self._forget_one(nodeid, abi.FORGET_IN.unpack_from(body)[0])
        return None

    def batch_forget(self, nodeid: int, body: memoryview) -> Reply:
        count, _ = abi.BATCH_FORGET_IN.unpack_from(body)
        for i in range(count):
            self._forget_one(*abi.FORGET_ONE.unpack_from(body, abi.BATCH_FORGET_IN.size + i * abi.FORGET_ONE.size))
        return None

    def getattr(self, nodeid: int, body: memoryview) -> Reply:
        attr = self.fs.getattr(nodeid)
        attr_s, attr_ns = _valid(attr.attr_timeout)
        return [abi.ATTR_OUT_HEAD.pack(attr_s, attr_ns, 0), attr_bytes(attr)]

    def readlink(self, nodeid: int, body: memoryview) -> Reply:
        return [self.fs.readlink(nodeid)]

    def access(self, nodeid: int, body: memoryview) -> Reply:
        self.fs.access(nodeid, abi.ACCESS_IN.unpack_from(body)[0])
        return []

    def statfs(self, nodeid: int, body: memoryview) -> Reply:
        s = self.fs.statfs()
        return [abi.KSTATFS.pack(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namemax, s.frsize, 0)]

    def getxattr(self, nodeid: int, body: memoryview) -> Reply:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        return _sized(size, self.fs.getxattr(nodeid, _name(body[abi.GETXATTR_IN.size:])))

    def listxattr(self, nodeid: int, body: memoryview) -> Reply:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        return _sized(size, b"".join(name + b"\0" for name in self.fs.listxattr(nodeid)))

    # ---- directories --------------------------------------------------------------------------

    def opendir(self, nodeid: int, body: memoryview) -> Reply:
        abi.OPEN_IN.unpack_from(body)
        fh = self.fs.opendir(nodeid)
        # a layer's directories never change: the kernel may keep their listings; the top one changes
        flags = 0 if nodeid == abi.ROOT_ID else abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE
        return [abi.OPEN_OUT.pack(fh, flags, 0)]

    def releasedir(self, nodeid: int, body: memoryview) -> Reply:
        self.fs.releasedir(abi.RELEASE_IN.unpack_from(body)[0])
        return []

    def readdir(self, nodeid: int, body: memoryview) -> Reply:
        return self._listing(body, plus=False)

    def readdirplus(self, nodeid: int, body: memoryview) -> Reply:
        return self._listing(body, plus=True)

    def _listing(self, body: memoryview, plus: bool) -> Reply:
        fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
        out: list[bytes] = []
        used = 0
        while entries := self.fs.readdir(fh, offset):
            for name, attr, next_offset in entries:
                record = abi.dirent_size(len(name), plus)
                if used + record > size:
                    return out
                head = entry_bytes(attr) if plus else b""
                dirent = abi.DIRENT_HEAD.pack(attr.ino, next_offset, len(name), stat.S_IFMT(attr.mode) >> 12)
                out.append(head + dirent + name + b"\0" * (record - len(head) - len(dirent) - len(name)))
                used += record
                if plus:  # the kernel takes a reference on every entry of a READDIRPLUS reply
                    self.lookups[attr.ino] = self.lookups.get(attr.ino, 0) + 1
                offset = next_offset
        return out

    # ---- files --------------------------------------------------------------------------------

    def open(self, nodeid: int, body: memoryview) -> Reply:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        fh = self.fs.open(nodeid, flags)
        # the inode's first open decides how it is served until its last close (passthrough.py)
        backing_id = self.files.open(nodeid, lambda: self.fs.backing_file(nodeid))
        if backing_id:
            return [abi.OPEN_OUT.pack(fh, abi.FOPEN_PASSTHROUGH, backing_id)]
        return [abi.OPEN_OUT.pack(fh, abi.FOPEN_KEEP_CACHE, 0)]

    def release(self, nodeid: int, body: memoryview) -> Reply:
        self.fs.release(abi.RELEASE_IN.unpack_from(body)[0])
        self.files.release(nodeid)
        return []
