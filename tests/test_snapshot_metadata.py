"""Snapshot metadata rules (containerd's), list filters, and layer trees built from TOCs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from converter.format import toc as fmt
from converter.format.errors import AlreadyExistsError, ConfigError, FailedPreconditionError, FormatError, NotFoundError
from snapshotter.fs.layer_tree import OPAQUE_XATTR, LayerTree
from snapshotter.service.filters import compile_filters, matches
from snapshotter.service.mounts import Layout, mounts_for
from snapshotter.service.store import ACTIVE, COMMITTED, VIEW, SnapshotStore


def test_store_follows_containerds_rules_and_survives_reopening(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "meta.db")
    store.create("a", "", ACTIVE, {"x": "1"})
    with pytest.raises(AlreadyExistsError):
        store.create("a", "", ACTIVE, {})
    with pytest.raises(FailedPreconditionError):
        store.create("b", "a", ACTIVE, {})  # parent not committed
    with pytest.raises(NotFoundError):
        store.create("b", "nope", ACTIVE, {})
    base = store.commit("base", "a", {"y": "2"}, size=10, inodes=3)
    assert base.kind == COMMITTED and base.labels == {"x": "1", "y": "2"} and store.find("a") is None
    store.create("child", "base", ACTIVE, {})
    with pytest.raises(FailedPreconditionError):
        store.remove("base")  # has a child
    with pytest.raises(FailedPreconditionError):
        store.commit("again", "base", {}, 0, 0)  # only active snapshots commit
    store.add_layer("sha256:" + "a" * 64, "reg/repo", 100)
    store.create("lazy", "base", COMMITTED, {}, layer="sha256:" + "a" * 64)
    store.close()

    reopened = SnapshotStore(tmp_path / "meta.db")
    assert [s.key for s in reopened.all()] == ["base", "child", "lazy"]
    assert [p.key for p in reopened.chain(reopened.get("child"))] == ["base"]
    assert reopened.layer_in_use("sha256:" + "a" * 64)
    assert reopened.layers()[0].slot == 1
    assert reopened.add_layer("sha256:" + "b" * 64, "reg/repo", 5).slot == 2


def test_mounts_are_those_of_the_overlayfs_snapshotter(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "meta.db")
    layout = Layout(tmp_path)
    first = store.create("first", "", ACTIVE, {})
    assert mounts_for(layout, first, [])[0].type == "bind" and "rw" in mounts_for(layout, first, [])[0].options
    store.commit("l1", "first", {}, 0, 0)
    digest = "sha256:" + "c" * 64
    store.create("l2", "l1", COMMITTED, {}, layer=digest)
    top = store.create("top", "l2", ACTIVE, {})
    (m,) = mounts_for(layout, top, store.chain(top))
    lower = next(o for o in m.options if o.startswith("lowerdir="))
    assert m.type == "overlay" and lower == f"lowerdir={tmp_path}/fuse/{'c' * 64}:{tmp_path}/snapshots/1/fs"
    view = store.create("view", "l2", VIEW, {})
    (v,) = mounts_for(layout, view, store.chain(view))
    assert v.type == "overlay" and not any(o.startswith("upperdir=") for o in v.options)


def test_filters_as_containerd_sends_them(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "meta.db")
    store.create("k", "", ACTIVE, {"containerd.io/snapshot.ref": "sha256:abc"})
    snap = store.commit("n", "k", {}, 0, 0)
    assert matches(snap, compile_filters(['labels."containerd.io/snapshot.ref"==sha256:abc,parent==""']))
    assert not matches(snap, compile_filters(['labels."containerd.io/snapshot.ref"==sha256:abd']))
    assert matches(snap, compile_filters(["kind==active", "name==n"]))  # any filter may match
    assert matches(snap, compile_filters(["labels.containerd.io/snapshot.ref"]))
    with pytest.raises(ConfigError):
        compile_filters(["bogus~=x"])


def _entry(path: str, type_: str, **kw: object) -> fmt.TocEntry:
    return fmt.TocEntry(path=path, type=type_, mode=kw.pop("mode", 0o644), **kw)  # type: ignore[arg-type]


def test_layer_tree_presents_whiteouts_opaque_dirs_and_hardlinks_as_overlayfs_wants() -> None:
    chunk = fmt.Chunk(0, 5, 0, 10, b"\0" * 32)
    toc = fmt.Toc(1 << 20, [
        _entry("a/file", fmt.FILE, size=5, chunks=[chunk]),
        _entry("a/link", fmt.HARDLINK, link="a/file"),
        _entry("gone", fmt.WHITEOUT),
        _entry("opq", fmt.OPAQUE),
        _entry("opq", fmt.DIR, mode=0o700, uid=7),
        _entry("sym", fmt.SYMLINK, link="a/file"),
        _entry("late", fmt.FILE, size=0, mtime=1 << 40),
    ])
    tree = LayerTree(3, toc)
    root = tree.root.children
    assert root is not None
    a = root[b"a"]
    assert a.mode == stat.S_IFDIR | 0o755  # never named by the tar: as containerd's applier makes it
    assert a.children[b"file"] is a.children[b"link"] and a.children[b"file"].nlink == 2
    assert stat.S_ISCHR(root[b"gone"].mode) and root[b"gone"].rdev == 0
    opq = root[b"opq"]
    assert opq.xattrs[OPAQUE_XATTR] == b"y" and opq.mode == stat.S_IFDIR | 0o700 and opq.uid == 7
    assert root[b"sym"].target == b"a/file" and root[b"sym"].size == 6
    assert root[b"late"].mtime_ns == 0  # past 2262: containerd applies the epoch
    assert all(ino >> 32 == 3 for ino in tree.inodes)
    assert LayerTree(3, toc).inodes.keys() == tree.inodes.keys()  # stable inode numbers


def test_layer_tree_nodes_share_nothing_they_may_change() -> None:
    """Nodes without xattrs share one empty mapping (cheaper trees): marking one directory opaque, or
    giving one its xattrs, reaches no other node; a replaced file leaves no unreachable inode."""
    chunk = fmt.Chunk(0, 5, 0, 10, b"\0" * 32)
    toc = fmt.Toc(1 << 20, [
        _entry("plain", fmt.DIR),
        _entry("plain/f", fmt.FILE, size=5, chunks=[chunk]),
        _entry("opq", fmt.DIR),
        _entry("opq", fmt.OPAQUE),
        _entry("x", fmt.DIR, xattrs={"user.k": b"v"}),
        _entry("f", fmt.FILE, size=0),
        _entry("f", fmt.FILE, size=0),  # tar lists it twice: the second wins
    ])
    tree = LayerTree(2, toc)
    root = tree.root.children
    assert root is not None
    assert root[b"opq"].xattrs == {OPAQUE_XATTR: b"y"} and root[b"x"].xattrs == {b"user.k": b"v"}
    plain = root[b"plain"]
    assert plain.xattrs == {} and plain.children[b"f"].xattrs == {} and root[b"f"].xattrs == {}
    assert tree.root.xattrs == {}
    assert plain.children[b"f"].chunks == [chunk] and root[b"f"].chunks == []
    reachable = {tree.root.ino, *(n.ino for n in root.values()), plain.children[b"f"].ino}
    assert set(tree.inodes) == reachable


def test_layer_tree_refuses_a_hardlink_to_nothing() -> None:
    with pytest.raises(FormatError):
        LayerTree(1, fmt.Toc(1 << 20, [_entry("x", fmt.HARDLINK, link="missing")]))
