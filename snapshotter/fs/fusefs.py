"""The node's single FUSE filesystem: one read-only directory per lazily served layer, named by the
layer digest's hex, used by overlayfs as lower directories.

This is the transport-neutral core: tree lookups, attributes as a plain `Attr`, directory entries,
reads as bytes, and every failure as one `FsError(errno)`. Two transports serve it: the pyfuse3
adapter (pyfuse3_ops.py) and peerpull's own session on /dev/fuse (kernel/session.py), so one
filesystem answers the same whichever speaks the protocol.

Image content never changes, so the kernel may cache entries, attributes and pages for a long
time (`keep_cache`); only the top directory (layers come and go) is revalidated. Every operation
is guarded by `fuse_handler` (guard.py) and answers with an errno: a bad chunk is EIO to the
reader, never wrong bytes, and an unexpected exception is EIO, never a hung syscall.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from converter.format import toc as fmt
from converter.format.errors import PeerpullError
from snapshotter.fs.file_reader import FileReader, LayerSource
from snapshotter.fs.guard import ENOATTR, FsError, fuse_handler
from snapshotter.fs.layer_tree import Inode, LayerTree

if TYPE_CHECKING:
    from snapshotter.fs.passthrough import Backing, Passthrough

log = structlog.get_logger(__name__)

ROOT_INODE = 1  # FUSE's root node id
CONTENT_TIMEOUT_S = 365 * 24 * 3600.0  # image content is immutable
TOP_TIMEOUT_S = 1.0  # the top directory changes as layers are added and removed
READDIR_BATCH = 256  # directory entries built per call; a transport asks again from the next offset
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT


@dataclass
class MountedLayer:
    digest: str
    name: bytes  # directory name under the mount: the digest's hex
    tree: LayerTree
    source: LayerSource


@dataclass(slots=True)
class Attr:
    """An inode's attributes as every transport reports them, with how long the kernel may cache them."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    time_ns: int  # atime = mtime = ctime
    entry_timeout: float
    attr_timeout: float


@dataclass(slots=True)
class StatFs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    namemax: int


class LayerFS:
    """The layers and the read-only operations on them (each guarded: it raises only FsError)."""

    def __init__(self, reader: FileReader, on_read: Callable[[], None] | None = None,
                 passthrough: Passthrough | None = None) -> None:
        self._reader = reader
        self._on_read = on_read  # counts read requests (per-read CPU in bench/coldstart)
        self.passthrough = passthrough  # complete files for FUSE passthrough (kernel transport only)
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
            raise FsError(errno.ENOENT)
        return layer, node

    # ---- attributes ---------------------------------------------------------------------------

    def _top_attr(self) -> Attr:
        return Attr(ROOT_INODE, stat.S_IFDIR | 0o755, 2 + len(self._by_name), 0, 0, 0, 0, 0, 4096,
                    self._started_ns, TOP_TIMEOUT_S, TOP_TIMEOUT_S)

    @staticmethod
    def _attr(node: Inode) -> Attr:
        return Attr(node.ino, node.mode, node.nlink, node.uid, node.gid, node.rdev, node.size,
                    (node.size + 511) // 512, 4096, max(node.mtime_ns, 0), CONTENT_TIMEOUT_S, CONTENT_TIMEOUT_S)

    @fuse_handler
    def getattr(self, inode: int) -> Attr:
        if inode == ROOT_INODE:
            return self._top_attr()
        return self._attr(self._node(inode)[1])

    @fuse_handler
    def lookup(self, parent_inode: int, name: bytes) -> Attr:
        if parent_inode == ROOT_INODE:
            if name == b"..":
                return self._top_attr()
            layer = self._by_name.get(name)
            if layer is None:
                raise FsError(errno.ENOENT)
            attr = self._attr(layer.tree.root)
            attr.entry_timeout = TOP_TIMEOUT_S  # the layer may go away
            return attr
        _, node = self._node(parent_inode)
        if node.children is None:
            raise FsError(errno.ENOTDIR)
        child = node.children.get(name)
        if child is None:
            raise FsError(errno.ENOENT)
        return self._attr(child)

    @fuse_handler
    def access(self, inode: int, mask: int) -> None:
        if inode != ROOT_INODE:
            self._node(inode)
        if mask & os.W_OK:
            raise FsError(errno.EROFS)

    @fuse_handler
    def readlink(self, inode: int) -> bytes:
        _, node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise FsError(errno.EINVAL)
        return node.target

    @fuse_handler
    def getxattr(self, inode: int, name: bytes) -> bytes:
        if inode == ROOT_INODE:
            raise FsError(ENOATTR)
        value = self._node(inode)[1].xattrs.get(name)
        if value is None:
            raise FsError(ENOATTR)
        return value

    @fuse_handler
    def listxattr(self, inode: int) -> list[bytes]:
        return [] if inode == ROOT_INODE else list(self._node(inode)[1].xattrs)

    @fuse_handler
    def statfs(self) -> StatFs:
        # overlayfs refuses a lower directory whose filesystem cannot answer statfs
        total = sum(layer.tree.bytes for layer in self._by_name.values())
        files = sum(len(layer.tree.inodes) for layer in self._by_name.values()) + 1
        return StatFs(bsize=4096, frsize=4096, blocks=(total + 4095) // 4096, bfree=0, bavail=0, files=files,
                      ffree=0, favail=0, namemax=255)

    # ---- directories --------------------------------------------------------------------------

    @fuse_handler
    def opendir(self, inode: int) -> int:
        if inode != ROOT_INODE:
            _, node = self._node(inode)
            if node.children is None:
                raise FsError(errno.ENOTDIR)
        return inode

    @fuse_handler
    def readdir(self, fh: int, start_id: int, limit: int = READDIR_BATCH) -> list[tuple[bytes, Attr, int]]:
        """Entries from `start_id` on (name, attributes, the offset of the next entry), at most `limit`."""
        if fh == ROOT_INODE:
            names = sorted(self._by_name)
            return [(names[i], self._attr(self._by_name[names[i]].tree.root), i + 1)
                    for i in range(start_id, min(len(names), start_id + limit))]
        _, node = self._node(fh)
        if node.children is None:  # opendir refused it; a stale handle is still not a directory
            raise FsError(errno.ENOTDIR)
        listing = node.listing()
        children = node.children
        return [(listing[i], self._attr(children[listing[i]]), i + 1)
                for i in range(start_id, min(len(listing), start_id + limit))]

    @fuse_handler
    def releasedir(self, fh: int) -> None:
        return None

    # ---- files --------------------------------------------------------------------------------

    @fuse_handler
    def open(self, inode: int, flags: int) -> int:
        """The file handle of a read-only open (the inode; the kernel may keep the file's pages)."""
        if flags & _WRITE_FLAGS:
            raise FsError(errno.EROFS)
        _, node = self._node(inode)
        if not stat.S_ISREG(node.mode):
            raise FsError(errno.EINVAL)
        return inode

    def backing_file(self, inode: int) -> Backing | None:
        """A complete, verified local copy of the file, for an OPEN the transport may answer with
        FUSE passthrough (None: served through READ)."""
        if self.passthrough is None:
            return None
        layer, node = self._node(inode)
        return self.passthrough.backing(layer.source, node.ino, node.size, node.chunks)

    @fuse_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        layer, node = self._node(fh)
        if self._on_read is not None:
            self._on_read()
        try:
            data = await self._reader.read(layer.source, node.ino, node.chunks, node.size, off, size)
        except PeerpullError as exc:
            log.error("fuse_read_failed", layer=layer.digest, inode=fh, offset=off, size=size, error=str(exc))
            raise FsError(errno.EIO) from None
        if self.passthrough is not None:
            self.passthrough.read_done(layer.source, node.ino, node.size, node.chunks, off + len(data) >= node.size)
        return data

    @fuse_handler
    def release(self, fh: int) -> None:
        return None


    # ---- live restart ---------------------------------------------------------------------------

    def add_state_hook(self, name: str, export: Callable[[], Any], adopt: Callable[[Any], None]) -> None:
        """Let a part carry its own state across a live restart in `extras[name]` (plain data):
        `export()` when the daemon hands over, `adopt(value)` in the successor (None: nothing came)."""
        self._state_hooks()[name] = (export, adopt)

    def _state_hooks(self) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]:
        return vars(self).setdefault("_hooks", {})  # type: ignore[no-any-return]

    def export_state(self) -> dict[str, Any]:
        """What a successor needs beyond the session: the layers served (slot → digest: node ids are
        derived from them, so the successor must serve the same slots) and each hook's `extras`."""
        return {"layers": {slot: layer.digest for slot, layer in self._by_slot.items()},
                "extras": {name: export() for name, (export, _) in self._state_hooks().items()}}

    def adopt_state(self, state: dict[str, Any]) -> list[str]:
        """Take a predecessor's `export_state()` once the layers are back (from the snapshot store);
        the layers it served that are not (or under another slot) here: their nodes answer ENOENT."""
        missing = []
        for slot, digest in dict(state.get("layers") or {}).items():
            layer = self._by_slot.get(int(slot))
            if layer is None or layer.digest != digest:
                missing.append(str(digest))
        extras = dict(state.get("extras") or {})
        for name, (_, adopt) in self._state_hooks().items():
            adopt(extras.get(name))
        return missing


OPERATIONS = ("getattr", "lookup", "access", "readlink", "getxattr", "listxattr", "statfs", "opendir", "readdir",
              "releasedir", "open", "read", "release")  # what a transport calls; each is guarded
