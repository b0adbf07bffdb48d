"""One layer's file tree, built from its TOC, in the form overlayfs expects of a lower directory.

Whiteouts become character devices 0/0 with the hidden name, an opaque marker becomes the
directory's `trusted.overlay.opaque = y` xattr; both exactly as containerd's overlayfs snapshotter
leaves them on disk, so the merged view is the same. Hardlinks share their target's inode.
Directories the tar never named get 0755 root:root, as containerd's applier creates them.
Inode numbers are `slot << 32 | index`: stable for a layer across daemon restarts.
"""

from __future__ import annotations

import os
import stat

from converter.format import toc as fmt
from converter.format.errors import FormatError

OPAQUE_XATTR = b"trusted.overlay.opaque"
_MODE_TYPE = {fmt.FILE: stat.S_IFREG, fmt.DIR: stat.S_IFDIR, fmt.SYMLINK: stat.S_IFLNK, fmt.CHAR: stat.S_IFCHR,
              fmt.BLOCK: stat.S_IFBLK, fmt.FIFO: stat.S_IFIFO}
MAX_INDEX = (1 << 32) - 1
_MAX_TIME_NS = 1 << 63  # nanoseconds since 1970 in a signed 64-bit integer (year 2262)
# shared by every node without xattrs / content (most of a layer): never mutated, replaced instead
_NO_XATTRS: dict[bytes, bytes] = {}
_NO_CHUNKS: list[fmt.Chunk] = []


class Inode:
    """One node of a layer: tens of thousands per layer, so slots and no per-node objects beyond
    what it has (the empty xattrs and chunks are shared)."""

    __slots__ = ("ino", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "target", "xattrs", "children",
                 "chunks", "nlink", "order")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0, size: int = 0, mtime_ns: int = 0,
                 rdev: int = 0) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = mtime_ns
        self.rdev = rdev
        self.target = b""  # symlink target
        self.xattrs: dict[bytes, bytes] = _NO_XATTRS
        self.children: dict[bytes, Inode] | None = {} if stat.S_ISDIR(mode) else None
        self.chunks: list[fmt.Chunk] = _NO_CHUNKS  # the TOC entry's own list for a file (read only)
        self.nlink = 1
        self.order: list[bytes] | None = None  # directory listing order, built on first readdir

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    def listing(self) -> list[bytes]:
        if self.order is None:
            assert self.children is not None
            self.order = sorted(self.children)
        return self.order


class LayerTree:
    """`root` is the layer's top directory; `inodes` maps every inode number of the layer to its node."""

    def __init__(self, slot: int, toc: fmt.Toc) -> None:
        if not 0 < slot < (1 << 30):
            raise ValueError("layer slot out of range")
        self.slot = slot
        self._next = 1
        self.inodes: dict[int, Inode] = {}
        self.root = self._new(stat.S_IFDIR | 0o755)
        self.bytes = 0
        self._replaced = False  # an entry replaced another: some nodes may be unreachable
        # directory path → its node: tar lists a directory's files together, so most entries find
        # their parent here without walking from the root (cleared when a directory is replaced)
        self._dirs: dict[str, Inode] = {}
        for entry in toc.entries:
            self._add(entry)
        self._count_links()

    def _new(self, mode: int, uid: int = 0, gid: int = 0, size: int = 0, mtime_ns: int = 0, rdev: int = 0) -> Inode:
        if self._next > MAX_INDEX:
            raise FormatError("layer has more than 2**32 entries")
        node = Inode((self.slot << 32) | self._next, mode, uid, gid, size, mtime_ns, rdev)
        self._next += 1
        self.inodes[node.ino] = node
        return node

    def _dir(self, path: str) -> Inode:
        """The directory at `path`, creating missing ones (and replacing a non-directory, as tar does)."""
        if path in (".", ""):
            return self.root
        node = self._dirs.get(path)
        if node is not None:
            return node
        node = self.root
        for part in path.split("/"):
            assert node.children is not None
            name = part.encode("utf-8", "surrogateescape")
            child = node.children.get(name)
            if child is None or not child.is_dir:
                child = self._new(stat.S_IFDIR | 0o755)
                node.children[name] = child
                node.order = None
            node = child
        self._dirs[path] = node
        return node

    def _lookup(self, path: str) -> Inode | None:
        node: Inode | None = self.root
        for part in ([] if path == "." else path.split("/")):
            if node is None or node.children is None:
                return None
            node = node.children.get(part.encode("utf-8", "surrogateescape"))
        return node

    def _place(self, path: str, node: Inode) -> None:
        parent_path, _, base = path.rpartition("/")
        parent = self._dir(parent_path)
        assert parent.children is not None
        name = base.encode("utf-8", "surrogateescape")
        old = parent.children.get(name)
        if old is not None:
            self._replaced = True
            if old.children is not None:
                self._dirs.clear()  # a directory replaced: paths below it name other nodes now
        parent.children[name] = node
        parent.order = None

    def _add(self, e: fmt.TocEntry) -> None:
        mtime_ns = e.mtime * 1_000_000_000 + e.mtime_nsec
        if not 0 <= mtime_ns < _MAX_TIME_NS:
            mtime_ns = 0  # as containerd's applier: times before 1970 or past 2262 do not fit and become 0
        if e.type == fmt.OPAQUE:
            node = self._dir(e.path)
            node.xattrs = {**node.xattrs, OPAQUE_XATTR: b"y"}
            return
        if e.type == fmt.WHITEOUT:
            self._place(e.path, self._new(stat.S_IFCHR, rdev=0, uid=e.uid, gid=e.gid, mtime_ns=mtime_ns))
            return
        if e.type == fmt.HARDLINK:
            target = self._lookup(e.link)
            if target is None or target.is_dir:
                raise FormatError(f"hardlink {e.path!r} points at {e.link!r}, which is not an earlier file of the layer")
            self._place(e.path, target)
            return
        kind = _MODE_TYPE.get(e.type)
        if kind is None:
            raise FormatError(f"entry {e.path!r} has unknown type {e.type!r}")
        if e.type == fmt.DIR:
            node = self._dir(e.path)  # keeps children listed earlier (tar may name a directory after its content)
            node.mode = kind | (e.mode & 0o7777)
            node.uid, node.gid, node.mtime_ns = e.uid, e.gid, mtime_ns
            opaque = node.xattrs.get(OPAQUE_XATTR)
            xattrs = {k.encode(): v for k, v in e.xattrs.items()} if e.xattrs else _NO_XATTRS
            node.xattrs = {**xattrs, OPAQUE_XATTR: opaque} if opaque else xattrs
            return
        rdev = os.makedev(e.devmajor, e.devminor) if e.devmajor or e.devminor else 0
        node = self._new(kind | (e.mode & 0o7777), uid=e.uid, gid=e.gid, size=e.size if e.type == fmt.FILE else 0,
                         mtime_ns=mtime_ns, rdev=rdev)
        if e.xattrs:
            node.xattrs = {k.encode(): v for k, v in e.xattrs.items()}
        if e.type == fmt.SYMLINK:
            node.target = e.link.encode("utf-8", "surrogateescape")
            node.size = len(node.target)
        elif e.type == fmt.FILE:
            chunks = e.chunks
            # a parsed TOC lists a file's pieces in file order already (decode_toc checks they tile it)
            node.chunks = sorted(chunks, key=lambda c: c.file_offset) if len(chunks) > 1 else chunks
            covered = chunks[0].length if len(chunks) == 1 else sum(c.length for c in chunks)
            if covered != e.size:
                raise FormatError(f"file {e.path!r}: chunks cover {covered} bytes, size is {e.size}")
            self.bytes += e.size
        self._place(e.path, node)

    def _count_links(self) -> None:
        """nlink as a filesystem reports it: names per inode; 2 + subdirectories for a directory."""
        for node in self.inodes.values():
            node.nlink = 0
        stack = [self.root]
        self.root.nlink = 2
        seen_dirs = {self.root.ino}
        while stack:
            d = stack.pop()
            assert d.children is not None
            for child in d.children.values():
                if child.is_dir:
                    if child.ino in seen_dirs:
                        continue
                    seen_dirs.add(child.ino)
                    child.nlink = 2
                    d.nlink += 1
                    stack.append(child)
                else:
                    child.nlink += 1
        # drop nodes no name reaches any more (replaced entries), so lookups by inode stay truthful
        if self._replaced:
            self.inodes = {ino: n for ino, n in self.inodes.items() if n.nlink > 0}

