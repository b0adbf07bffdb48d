"""The pyfuse3 transport of the layer filesystem: a thin `pyfuse3.Operations` over the core
(fusefs.LayerFS) that turns its plain results into pyfuse3's types and `FsError` into `FUSEError`.

Each handler is wrapped by `_answers`: under pyfuse3's asyncio loop any exception other than
`FUSEError` is lost and the caller's syscall hangs, so whatever escapes (the core already logged
its own failures) is answered with an errno here.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import structlog

from snapshotter.fs.fusefs import Attr, LayerFS
from snapshotter.fs.guard import GUARD_MARK, FsError, errno_for

log = structlog.get_logger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _answers(handler: F) -> F:
    op = handler.__name__

    @functools.wraps(handler)
    async def answered(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # noqa: BLE001 - the pyfuse3 seam: nothing else may reach its loop
            code = errno_for(exc)
            log.error("fuse_handler_failed", op=op, errno=errno.errorcode.get(code, code), error=repr(exc),
                      exc_info=True)
            raise pyfuse3.FUSEError(code) from None

    setattr(answered, GUARD_MARK, True)
    return answered  # type: ignore[return-value]


def entry_attributes(attr: Attr) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = attr.ino
    a.st_mode = attr.mode
    a.st_nlink = attr.nlink
    a.st_uid = attr.uid
    a.st_gid = attr.gid
    a.st_rdev = attr.rdev
    a.st_size = attr.size
    a.st_blksize = attr.blksize
    a.st_blocks = attr.blocks
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = attr.time_ns
    a.entry_timeout = attr.entry_timeout
    a.attr_timeout = attr.attr_timeout
    return a


class Pyfuse3Operations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, fs: LayerFS) -> None:
        super().__init__()
        self.fs = fs

    @_answers
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.fs.getattr(inode))

    @_answers
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
                     ) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.fs.lookup(parent_inode, name))

    @_answers
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.fs.access(inode, mode)
        return True

    @_answers
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_answers
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.getxattr(inode, name)

    @_answers
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.fs.listxattr(inode)

    @_answers
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize, s.f_blocks = st.bsize, st.frsize, st.blocks
        s.f_bfree, s.f_bavail = st.bfree, st.bavail
        s.f_files, s.f_ffree, s.f_favail = st.files, st.ffree, st.favail
        s.f_namemax = st.namemax
        return s

    @_answers
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.fs.opendir(inode)

    @_answers
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        while True:
            entries = self.fs.readdir(fh, start_id)
            if not entries:
                return
            for name, attr, next_id in entries:
                if not pyfuse3.readdir_reply(token, name, entry_attributes(attr), next_id):
                    return
                start_id = next_id

    @_answers
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @_answers
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=self.fs.open(inode, flags), keep_cache=True)

    @_answers
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @_answers
    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    @_answers
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inodes live as long as their layer
