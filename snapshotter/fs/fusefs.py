"""The node's single FUSE mount: one read-only directory per lazily served layer, named by the
layer digest's hex, used by overlayfs as lower directories.

Image content never changes, so the kernel may cache entries, attributes and pages for a long
time (`keep_cache`); only the top directory (layers come and go) is revalidated. Every handler
is guarded by `fuse_handler` (guard.py) and answers with an errno: a bad chunk is EIO to the
reader, never wrong bytes, and an unexpected exception is EIO, never a hung syscall.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyfuse3
import structlog

from converter.format import toc as fmt
from converter.format.errors import PeerpullError
from snapshotter.fs.file_reader import FileReader, LayerSource
from snapshotter.fs.guard import fuse_handler
from snapshotter.fs.layer_tree import Inode, LayerTree

log = structlog.get_logger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
CONTENT_TIMEOUT_S = 365 * 24 * 3600.0  # image content is immutable
TOP_TIMEOUT_S = 1.0  # the top directory changes as layers are added and removed
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


@dataclass
class MountedLayer:
    digest: str
    name: bytes  # directory name under the mount: the digest's hex
    tree: LayerTree
    source: LayerSource


class LayerFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, reader: FileReader, on_read: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._reader = reader
        self._on_read = on_read  # counts read requests (per-read CPU in bench/coldstart)
        self._by_name: dict[bytes, MountedLayer] = {}
        self._by_slot: dict[int, MountedLayer] = {}
        self._started_ns = time.time_ns()

    # ---- layers -------------------------------------------------------------------------------

    @staticmethod
    def build_layer(digest: str, slot: int, repository: str, toc: fmt.Toc) -> MountedLayer:
        """The layer's tree and chunk index (CPU work: callers may run it in a worker thread)."""
        return MountedLayer(digest, digest.split(":", 1)[1].encode(), LayerTree(slot, toc),
                            LayerSource.from_toc(repository, digest, toc))

    def add_layer(self, digest: str, slot: int, repository: str, toc: fmt.Toc) -> MountedLayer:
        return self.add_built(self.build_layer(digest, slot, repository, toc))

    def add_built(self, layer: MountedLayer) -> MountedLayer:
        slot, digest = layer.tree.slot, layer.digest
        if slot in self._by_slot:
            return self._by_slot[slot]
        self._by_name[layer.name] = layer
        self._by_slot[slot] = layer
        log.info("layer_mounted", layer=digest, slot=slot, entries=len(layer.tree.inodes), bytes=layer.tree.bytes)
        return layer

    def remove_layer(self, digest: str) -> None:
        layer = self._by_name.pop(digest.split(":", 1)[1].encode(), None)
        if layer is not None:
            self._by_slot.pop(layer.tree.slot, None)
            log.info("layer_unmounted", layer=digest)

    def source(self, digest: str) -> LayerSource | None:
        """Where a mounted layer's chunks come from (None: not mounted)."""
        layer = self._by_name.get(digest.split(":", 1)[-1].encode())
        return layer.source if layer is not None else None

    def frames(self, digest: str) -> dict[int, int] | None:
        """The blob offsets of a mounted layer's frames (keys), None when it is not mounted."""
        source = self.source(digest)
        return source.next_offset if source is not None else None

    def _node(self, ino: int) -> tuple[MountedLayer, Inode]:
        layer = self._by_slot.get(ino >> 32)
        node = layer.tree.inodes.get(ino) if layer is not None else None
        if layer is None or node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return layer, node

    # ---- attributes ---------------------------------------------------------------------------

    def _top_attr(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT_INODE
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self._by_name)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._started_ns
        a.st_blksize = 4096
        a.entry_timeout = a.attr_timeout = TOP_TIMEOUT_S
        return a

    @staticmethod
    def _attr(node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = 4096
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = max(node.mtime_ns, 0)
        a.entry_timeout = a.attr_timeout = CONTENT_TIMEOUT_S
        return a

    @fuse_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._top_attr()
        return self._attr(self._node(inode)[1])

    @fuse_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
                     ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INODE:
            if name == b"..":
                return self._top_attr()
            layer = self._by_name.get(name)
            if layer is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr = self._attr(layer.tree.root)
            attr.entry_timeout = TOP_TIMEOUT_S  # the layer may go away
            return attr
        _, node = self._node(parent_inode)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = node.children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(child)

    @fuse_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        _, node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    @fuse_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT_INODE:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = self._node(inode)[1].xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [] if inode == ROOT_INODE else list(self._node(inode)[1].xattrs)

    @fuse_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # overlayfs refuses a lower directory whose filesystem cannot answer statfs
        s = pyfuse3.StatvfsData()
        total = sum(layer.tree.bytes for layer in self._by_name.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = sum(len(layer.tree.inodes) for layer in self._by_name.values()) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # ---- directories --------------------------------------------------------------------------

    @fuse_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INODE:
            _, node = self._node(inode)
            if node.children is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == ROOT_INODE:
            names = sorted(self._by_name)
            for index in range(start_id, len(names)):
                attr = self._attr(self._by_name[names[index]].tree.root)
                if not pyfuse3.readdir_reply(token, names[index], attr, index + 1):
                    return
            return
        _, node = self._node(fh)
        if node.children is None:  # opendir refused it; a stale handle is still not a directory
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        names = node.listing()
        for index in range(start_id, len(names)):
            if not pyfuse3.readdir_reply(token, names[index], self._attr(node.children[names[index]]), index + 1):
                return

    @fuse_handler
    async def releasedir(self, fh: int) -> None:
        return None

    # ---- files --------------------------------------------------------------------------------

    @fuse_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        _, node = self._node(inode)
        if not stat.S_ISREG(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @fuse_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        layer, node = self._node(fh)
        if self._on_read is not None:
            self._on_read()
        try:
            return await self._reader.read(layer.source, node.ino, node.chunks, node.size, off, size)
        except PeerpullError as exc:
            log.error("fuse_read_failed", layer=layer.digest, inode=fh, offset=off, size=size, error=str(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None

    @fuse_handler
    async def release(self, fh: int) -> None:
        return None

    @fuse_handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inodes live as long as their layer
