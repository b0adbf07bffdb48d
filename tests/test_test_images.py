"""The test infrastructure against real parts: the corner-case image is a valid OCI image that
umoci, skopeo, a Distribution registry and containerd accept, and the tree a container sees is
exactly the tree computed from the layer tars."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import pytest

from converter.registry import media_types as mt
from tests.support import images
from tests.support.containerd import ContainerdProcess, CtrError, pull_image, run_container
from tests.support.containerd_fixtures import containerd_missing
from tests.support.tree import Tree, container_tree, directory_tree, expected_tree_from_layers


def header_types(tar: bytes) -> list[bytes]:
    """The typeflag of every raw 512-byte header, in order (PAX 'x'/'g' and GNU 'L'/'K' included)."""
    flags, offset = [], 0
    while offset + 512 <= len(tar) and tar[offset:offset + 512] != bytes(512):
        header = tar[offset:offset + 512]
        flags.append(header[156:157])
        field = header[124:136]
        size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.strip(b"\0 ") or b"0", 8)
        offset += 512 + -(-size // 512) * 512
    return flags


def test_corner_case_layers_hold_every_header_kind_and_entry_type() -> None:
    base, gnu, third = images.corner_case_layer_tars()
    assert b"x" in header_types(base) and b"g" not in header_types(base)
    assert {b"L", b"K"} <= set(header_types(gnu)) and b"x" not in header_types(gnu)
    assert header_types(third)[0] == b"g"
    members = []
    for tar in (base, gnu, third):
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            members += tf.getmembers()
    types = {m.type for m in members}
    assert {tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
            tarfile.FIFOTYPE} <= types
    names = [m.name for m in members]
    assert max(map(len, names)) > 255 and max(len(m.linkname) for m in members) > 150
    assert any(n.endswith("/.wh..wh..opq") for n in names) and sum("/.wh." in n for n in names) >= 4
    assert {0o4755, 0o2755, 0o1777, 0o000} <= {m.mode for m in members}
    assert max(m.uid for m in members) >= 8**7  # PAX / base-256 ids
    assert any("SCHILY.xattr.user.foo" in m.pax_headers for m in members)
    sizes = {m.size for m in members if m.isreg()}
    assert {0, 1, images.CHUNK - 1, images.CHUNK, images.CHUNK + 1, 3 * images.CHUNK + 7} <= sizes


def test_layouts_are_deterministic(tmp_path: Path) -> None:
    first = images.build_corner_case_image(tmp_path / "a")
    second = images.build_corner_case_image(tmp_path / "b")
    assert first.manifest_digest == second.manifest_digest
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    small = images.build_corner_case_image(tmp_path / "c", chunk_size=4096)
    assert small.manifest_digest != first.manifest_digest
    assert images.read_oci_image(tmp_path / "a") == first
    assert [layer.media_type for layer in first.layers] == [mt.OCI_LAYER_GZIP] * 3


def _without_mtimes(tree: Tree, paths: tuple[str, ...]) -> Tree:
    return {p: (n._replace(mtime=None) if p in paths else n) for p, n in tree.items()}


@pytest.mark.root
def test_umoci_and_skopeo_accept_the_layout(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("umoci needs root to make device nodes and set owners")
    # umoci 0.4.7 fails on a global PAX header ("unknown typeflag 'g'"), so it gets the image without it.
    image = images.build_corner_case_image(tmp_path / "layout", global_pax_header=False)
    inspect = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{image.layout_dir}:latest"],
                                        check=True, capture_output=True, text=True).stdout)
    assert inspect["Layers"] == [layer.digest for layer in image.layers]
    subprocess.run(["umoci", "unpack", "--image", f"{image.layout_dir}:latest", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    # Tar mtimes outside containerd's range: the expected tree holds containerd's epoch, umoci wraps them.
    unpacked = _without_mtimes(directory_tree(tmp_path / "bundle" / "rootfs"), images.OUT_OF_RANGE_MTIMES)
    expected = _without_mtimes(expected_tree_from_layers(image.layer_tars()), images.OUT_OF_RANGE_MTIMES)
    assert unpacked == expected


def _registry_manifest(registry_url: str, repo: str, tag: str) -> bytes:
    request = urllib.request.Request(f"{registry_url}/v2/{repo}/manifests/{tag}", headers={"Accept": mt.OCI_MANIFEST})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def test_push_keeps_manifest_and_blobs(registry, corner_case_image: images.OciImage) -> None:
    ref = images.push_layout(corner_case_image.layout_dir, registry.address, "corner/push", "v1", layout_tag="latest")
    assert ref == f"{registry.address}/corner/push:v1"
    pushed = _registry_manifest(registry.url, "corner/push", "v1")
    local = corner_case_image.layout_dir / "blobs" / "sha256" / corner_case_image.manifest_digest.removeprefix("sha256:")
    assert pushed == local.read_bytes()  # not rewritten, so no layer was recompressed
    assert [d["digest"] for d in json.loads(pushed)["layers"]] == [layer.digest for layer in corner_case_image.layers]


@pytest.mark.root
@pytest.mark.slow
def test_container_sees_exactly_the_tree_of_the_layers(containerd: ContainerdProcess, registry,
                                                       corner_case_image: images.OciImage, tmp_path: Path) -> None:
    ref = images.push_layout(corner_case_image.layout_dir, registry.address, "corner/tree", "latest")
    pull_image(containerd, ref)
    assert run_container(containerd, ref, []).strip() == images.ENTRYPOINT_OUTPUT  # Entrypoint + Cmd
    expected = expected_tree_from_layers(corner_case_image.layer_tars())
    seen = container_tree(containerd, ref)
    # Devices, fifos, setuid bits, big ids, hardlink counts and symlink mtimes all arrive intact:
    # runc mounts its own /dev and leaves device nodes elsewhere in the rootfs alone.
    assert seen == expected
    assert not set(images.REMOVED) & set(seen)
    assert seen["/devices/char-1-3"].rdev == (1, 3) and seen["/devices/char-big"].rdev == (250, 70_000)
    assert seen["/hardlinks/across-dirs"].nlink == 2 and seen["/files/setuid"].mode == "4755"
    assert seen["/opaque/old-a"].size == len(b"re-added in the opaque layer")
    assert seen["/file-becomes-dir"].kind == "dir" and seen["/dir-becomes-file"].kind == "file"
    assert seen["/gnu/mtime-2514"].mtime == 0  # containerd clamps times past 2262 to the epoch

    # The same image mounted on the host by containerd: same tree, plus xattrs busybox cannot read.
    target = tmp_path / "mnt"
    target.mkdir()
    containerd.ctr("images", "mount", ref, str(target))
    try:
        assert directory_tree(target) == expected
        assert os.getxattr(target / "files" / "xattrs", "user.foo") == b"bar"
        assert os.getxattr(target / "files" / "xattrs", "user.empty") == b""
    finally:
        containerd.ctr("images", "unmount", "--rm", str(target))


@pytest.mark.root
def test_simple_image_and_run_errors(containerd: ContainerdProcess, registry, tmp_path: Path) -> None:
    image = images.build_simple_image(tmp_path / "layout", {"srv/hello.txt": b"hello\n", "empty": b""})
    ref = images.push_layout(image.layout_dir, registry.address, "simple")
    pull_image(containerd, ref)
    assert run_container(containerd, ref, ["/bin/cat", "/srv/hello.txt"]) == "hello\n"
    assert run_container(containerd, ref, ["/bin/ls", "/sys/class/net"]).split() == ["lo"]  # no CNI: loopback only
    with pytest.raises(CtrError, match="exited 3"):
        run_container(containerd, ref, ["/bin/sh", "-c", "echo oops >&2; exit 3"])


@pytest.mark.root
def test_stop_ends_tasks_and_unmounts(registry, tmp_path: Path) -> None:
    reason = containerd_missing()
    if reason:
        pytest.skip(reason)
    image = images.build_simple_image(tmp_path / "layout", {"x": b"x"})
    ref = images.push_layout(image.layout_dir, registry.address, "sleeper")
    # A long directory name: the sockets must move to a short private directory.
    ctrd = ContainerdProcess(tmp_path / ("d" * 80) / "containerd").start()
    try:
        assert len(str(ctrd.socket)) <= 100
        pull_image(ctrd, ref)
        ctrd.ctr("run", "-d", "--runc-root", str(ctrd.root / "runc"), ref, "sleeper", "/bin/busybox", "sleep", "1000")
        assert "sleeper" in ctrd.ctr("tasks", "ls", "-q").stdout
    finally:
        ctrd.stop()
    mounts = Path("/proc/self/mounts").read_text()
    assert str(ctrd.root) not in mounts
    shims = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(ctrd.socket).encode() in _cmdline(p)]
    assert shims == []
    assert not ctrd.socket.parent.exists() or ctrd.socket.parent == ctrd.root


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
