"""The file tree of an image as one comparable value: seen inside a running container, on a host
directory (an unpacked rootfs, a snapshot mount), or computed from the layer tars.

Each path ("/a/b") maps to a `Node`. What a runtime or a filesystem legitimately changes is
None by design: a directory's size, link count and mtime (runc creates mount points in "/",
overlayfs and ext4 count directory links differently). "/" itself and RUNTIME_PATHS are left out.
Not covered: xattrs (busybox cannot read them; check them on a mounted image with os.getxattr).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from tests.support.containerd import ContainerdProcess, run_container

# Mounted by runc from containerd's default spec (ctr run): never part of the image's tree.
RUNTIME_PATHS = ("/proc", "/sys", "/dev", "/run")
_SEP = "\x1f"  # no test image has this byte in a name or a link target


class Node(NamedTuple):
    kind: str  # dir, file, symlink, char, block, fifo, socket
    mode: str  # permission bits with setuid/setgid/sticky, octal: "4755"
    uid: int
    gid: int
    size: int | None = None  # regular files
    nlink: int | None = None  # non-directories
    mtime: int | None = None  # non-directories, whole seconds
    rdev: tuple[int, int] | None = None  # char and block devices
    target: str | None = None  # symlinks
    sha256: str | None = None  # regular files


Tree = dict[str, Node]

_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def _node(mode: int, uid: int, gid: int, size: int, nlink: int, mtime: int, rdev: tuple[int, int]) -> Node:
    kind = _KINDS[stat.S_IFMT(mode)]
    if kind == "dir":
        return Node(kind, f"{stat.S_IMODE(mode):o}", uid, gid)
    return Node(kind, f"{stat.S_IMODE(mode):o}", uid, gid, size if kind == "file" else None, nlink, mtime,
                rdev if kind in ("char", "block") else None)


def is_runtime_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in RUNTIME_PATHS)


# One `stat` per path (lstat: busybox stat does not follow links), then hashes and link targets.
_PRUNE = " -o ".join(f"-path {p}" for p in RUNTIME_PATHS)
TREE_SCRIPT = f"""
set -e
B=/bin/busybox
$B find / -xdev \\( {_PRUNE} \\) -prune -o -exec $B stat -c 'S{_SEP}%f{_SEP}%u{_SEP}%g{_SEP}%s{_SEP}%h{_SEP}%Y{_SEP}%t{_SEP}%T{_SEP}%n' {{}} +
$B find / -xdev \\( {_PRUNE} \\) -prune -o -type f -exec $B sha256sum {{}} + | while IFS= read -r line; do
  $B printf 'H{_SEP}%s{_SEP}%s\\n' "${{line%%  *}}" "${{line#*  }}"
done
$B find / -xdev \\( {_PRUNE} \\) -prune -o -type l -print | while IFS= read -r p; do
  $B printf 'L{_SEP}%s{_SEP}%s\\n' "$($B readlink "$p")" "$p"
done
echo END-OF-TREE
"""


def parse_tree(output: str) -> Tree:
    """The Tree printed by TREE_SCRIPT (without "/" itself and the runtime mounts)."""
    lines = output.splitlines()
    if not lines or lines[-1] != "END-OF-TREE":
        raise ValueError(f"incomplete tree output: {output[-2000:]!r}")
    tree: Tree = {}
    hashes: dict[str, str] = {}
    targets: dict[str, str] = {}
    for line in lines[:-1]:
        kind, _, rest = line.partition(_SEP)
        if kind == "S":
            raw_mode, uid, gid, size, nlink, mtime, major, minor, path = rest.split(_SEP, 8)
            tree[path] = _node(int(raw_mode, 16), int(uid), int(gid), int(size), int(nlink), int(mtime),
                               (int(major, 16), int(minor, 16)))
        elif kind == "H":
            digest, path = rest.split(_SEP, 1)
            hashes[path] = digest
        elif kind == "L":
            target, path = rest.split(_SEP, 1)
            targets[path] = target
        else:
            raise ValueError(f"unexpected tree line {line!r}")
    for path, node in tree.items():
        tree[path] = node._replace(sha256=hashes.get(path), target=targets.get(path))
    return {p: n for p, n in tree.items() if p != "/" and not is_runtime_path(p)}


def container_tree(ctrd: ContainerdProcess, image_ref: str, snapshotter: str | None = None) -> Tree:
    """The tree a container of `image_ref` (already pulled/unpacked) sees, via its /bin/busybox."""
    return parse_tree(run_container(ctrd, image_ref, ["/bin/busybox", "sh", "-c", TREE_SCRIPT], snapshotter))


def directory_tree(root: Path) -> Tree:
    """The same view of a rootfs directory on the host (an umoci bundle, a mounted snapshot)."""
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            path = "/" + os.path.relpath(full, root)
            node = _node(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, int(st.st_mtime),
                         (os.major(st.st_rdev), os.minor(st.st_rdev)))
            if node.kind == "symlink":
                node = node._replace(target=os.readlink(full))
            elif node.kind == "file":
                with open(full, "rb") as f:
                    node = node._replace(sha256=hashlib.file_digest(f, "sha256").hexdigest())
            tree[path] = node
    return {p: n for p, n in tree.items() if not is_runtime_path(p)}


_MAX_MTIME = ((1 << 63) - 1) / 1e9  # containerd keeps times as int64 nanoseconds


def _applied_mtime(mtime: float) -> int:
    # containerd's unpacker sets times outside [1970, 2262] to the epoch (archive.boundTime).
    return int(mtime) if 0 <= mtime <= _MAX_MTIME else 0


def _norm(name: str) -> str:
    return "/" + "/".join(part for part in name.split("/") if part not in ("", "."))


class _Inode:
    """What hardlinks share; nlink counts the names given in the layer that made it, as the
    layer's directory on disk (and so overlayfs) reports it even after a later whiteout."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.nlink = 1


def _entry_node(tf: tarfile.TarFile, m: tarfile.TarInfo) -> Node:
    mode = 0o777 if m.issym() else m.mode & 0o7777  # Linux symlinks are always 0777
    if m.isdir():
        return Node("dir", f"{mode:o}", m.uid, m.gid)
    kind = {tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
            tarfile.FIFOTYPE: "fifo"}.get(m.type, "file")
    data = tf.extractfile(m) if kind == "file" else None
    return Node(kind, f"{mode:o}", m.uid, m.gid, m.size if data is not None else None, 1, _applied_mtime(m.mtime),
                (m.devmajor, m.devminor) if kind in ("char", "block") else None,
                m.linkname if kind == "symlink" else None,
                hashlib.sha256(data.read()).hexdigest() if data is not None else None)


def _apply_layer(tree: dict[str, _Inode], tf: tarfile.TarFile) -> None:
    def remove(path: str) -> None:
        for p in [p for p in tree if p == path or p.startswith(path + "/")]:
            del tree[p]

    members = tf.getmembers()
    # Whiteouts hide what the lower layers hold; entries of this same layer stay.
    for m in members:
        parent, _, base = _norm(m.name).rpartition("/")
        if base == ".wh..wh..opq":
            for p in [p for p in tree if p.startswith(parent + "/")]:
                del tree[p]
        elif base.startswith(".wh."):
            remove(f"{parent}/{base[4:]}")
    for m in members:
        path = _norm(m.name)
        if path == "/" or path.rsplit("/", 1)[1].startswith(".wh."):
            continue
        parts = path.split("/")
        for i in range(2, len(parts)):  # missing parents are made 0755 root:root
            tree.setdefault("/".join(parts[:i]), _Inode(Node("dir", "755", 0, 0)))
        if m.islnk():  # our images give a hardlink its target's owner, mode and mtime, as tar does
            inode = tree[_norm(m.linkname)]
            inode.nlink += 1
            remove(path)
            tree[path] = inode
            continue
        node = _entry_node(tf, m)
        old = tree.get(path)
        if not (old and old.node.kind == "dir" and node.kind == "dir"):
            remove(path)  # anything but dir-over-dir replaces the old entry and its subtree
        tree[path] = _Inode(node)


def expected_tree_from_layers(layer_tars: Iterable[bytes]) -> Tree:
    """Apply the layers (uncompressed tars, bottom first) with OCI whiteout semantics, as
    containerd's unpacker does; the result compares equal to container_tree of the image."""
    tree: dict[str, _Inode] = {}
    for tar in layer_tars:
        with tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8") as tf:
            _apply_layer(tree, tf)
    return {p: (i.node if i.node.kind == "dir" else i.node._replace(nlink=i.nlink))
            for p, i in tree.items() if not is_runtime_path(p)}
