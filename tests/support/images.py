"""Test images as OCI layouts, built in pure Python and deterministic (fixed mtimes, gzip mtime 0).

`build_corner_case_image` holds every tar corner case the converter and the snapshotter must
reproduce; `build_simple_image` is for small tests; `push_layout` puts a layout into a registry.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.format.digest import sha256_digest
from converter.registry import media_types as mt

CHUNK = 64 * 1024  # the chunk size the tests convert with: boundaries are cheap to hit
FIXED_MTIME = 1_700_000_000
BUSYBOX = Path("/bin/busybox")  # static, so the image needs no libc
APPLETS = ("sh", "ls", "cat", "echo", "find", "stat", "sha256sum", "readlink", "sort", "printf", "test", "head")


class LayerBuilder:
    """The entries of one layer tar, in order. Parent directories must be added explicitly."""

    def __init__(self, tar_format: int = tarfile.PAX_FORMAT, global_pax: dict[str, str] | None = None) -> None:
        self.tar_format = tar_format
        self.global_pax = global_pax
        self.members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _add(self, name: str, type_: bytes, mode: int, data: bytes | None = None, **attrs: Any) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = type_, mode, FIXED_MTIME
        for key, value in attrs.items():
            setattr(info, key, value)
        info.size = len(data) if data is not None else 0
        self.members.append((info, data))
        return info

    def dir(self, name: str, mode: int = 0o755, **attrs: Any) -> None:
        self._add(name, tarfile.DIRTYPE, mode, **attrs)

    def file(self, name: str, data: bytes, mode: int = 0o644, **attrs: Any) -> None:
        self._add(name, tarfile.REGTYPE, mode, data, **attrs)

    def symlink(self, name: str, target: str, **attrs: Any) -> None:
        self._add(name, tarfile.SYMTYPE, 0o777, linkname=target, **attrs)

    def hardlink(self, name: str, target: str) -> None:
        # Same owner, mode and mtime as the target, as real tar writes them: containerd applies a
        # hardlink header's uid/gid to the shared inode.
        info = next(i for i, _ in reversed(self.members) if i.name == target and i.isreg())
        self._add(name, tarfile.LNKTYPE, info.mode, linkname=target, uid=info.uid, gid=info.gid, mtime=info.mtime)

    def device(self, name: str, type_: bytes, major: int, minor: int, mode: int = 0o660) -> None:
        self._add(name, type_, mode, devmajor=major, devminor=minor)

    def fifo(self, name: str, mode: int = 0o644) -> None:
        self._add(name, tarfile.FIFOTYPE, mode)

    def whiteout(self, path: str) -> None:
        parent, _, base = path.rpartition("/")
        self.file(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"")

    def opaque(self, directory: str) -> None:
        self.file(f"{directory}/.wh..wh..opq", b"")

    def tar_bytes(self) -> bytes:
        buf = io.BytesIO()
        # A non-empty pax_headers makes tarfile write a global ('g') header first.
        kwargs: dict[str, Any] = {"pax_headers": self.global_pax} if self.global_pax else {}
        with tarfile.open(fileobj=buf, mode="w", format=self.tar_format, encoding="utf-8", **kwargs) as tf:
            for info, data in self.members:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


@dataclass(frozen=True)
class LayerBlob:
    path: Path
    digest: str
    size: int
    media_type: str
    diff_id: str

    def tar_bytes(self) -> bytes:
        """The uncompressed layer tar."""
        data = self.path.read_bytes()
        return gzip.decompress(data) if self.media_type == mt.OCI_LAYER_GZIP else data


@dataclass(frozen=True)
class OciImage:
    layout_dir: Path
    tag: str
    manifest_digest: str
    config: dict[str, Any]
    layers: list[LayerBlob]

    def layer_tars(self) -> list[bytes]:
        return [layer.tar_bytes() for layer in self.layers]


def _write_blob(layout_dir: Path, data: bytes) -> tuple[Path, str]:
    digest = sha256_digest(data)
    path = layout_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, digest


def write_oci_image(layout_dir: Path, layer_tars: list[bytes], *, tag: str = "latest", entrypoint: list[str] | None = None,
                    cmd: list[str] | None = None, compression: str = "gzip") -> OciImage:
    """Write a fresh OCI layout holding one linux/amd64 image; `compression` is "gzip" or "none"."""
    if layout_dir.exists():
        shutil.rmtree(layout_dir)
    layout_dir.mkdir(parents=True)
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layers = []
    for tar in layer_tars:
        blob = gzip.compress(tar, compresslevel=6, mtime=0) if compression == "gzip" else tar
        path, digest = _write_blob(layout_dir, blob)
        media_type = mt.OCI_LAYER_GZIP if compression == "gzip" else mt.OCI_LAYER_TAR
        layers.append(LayerBlob(path, digest, len(blob), media_type, sha256_digest(tar)))
    run_config: dict[str, Any] = {"Env": ["PATH=/usr/bin:/bin"], "Cmd": cmd or ["/bin/sh"]}
    if entrypoint:
        run_config["Entrypoint"] = entrypoint
    config = {"architecture": "amd64", "os": "linux", "config": run_config,
              "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    _, config_digest = _write_blob(layout_dir, config_bytes)
    manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size} for layer in layers]}
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    _, manifest_digest = _write_blob(layout_dir, manifest_bytes)
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [{
        "mediaType": mt.OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest_bytes),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout_dir / "index.json").write_text(json.dumps(index, sort_keys=True))
    return OciImage(layout_dir, tag, manifest_digest, config, layers)


def read_oci_image(layout_dir: Path, tag: str = "latest") -> OciImage:
    """The image tagged `tag` in an OCI layout (any writer), with its layer blobs."""
    def blob(digest: str) -> Path:
        return layout_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")

    index = json.loads((layout_dir / "index.json").read_text())
    desc = next(d for d in index["manifests"] if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads(blob(desc["digest"]).read_bytes())
    config = json.loads(blob(manifest["config"]["digest"]).read_bytes())
    layers = [LayerBlob(blob(d["digest"]), d["digest"], d["size"], d["mediaType"], diff_id)
              for d, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"])]
    return OciImage(layout_dir, tag, desc["digest"], config, layers)


def push_layout(layout_dir: Path, registry_address: str, repo: str, tag: str = "latest",
                layout_tag: str | None = None) -> str:
    """Copy the image tagged `layout_tag` (default: `tag`) of an OCI layout into a plain-HTTP
    registry as `<address>/<repo>:<tag>`, and return that reference.

    skopeo keeps each blob's compression unless told otherwise (--dest-compress*), and
    --preserve-digests makes it fail rather than push a rewritten manifest.
    """
    ref = f"{registry_address}/{repo}:{tag}"
    cmd = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
           f"oci:{layout_dir}:{layout_tag or tag}", f"docker://{ref}"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy to {ref} failed: {result.stderr.strip()}")
    return ref


def busybox_layer() -> LayerBuilder:
    """/bin/busybox plus applet symlinks, so the image can run shell scripts; /tmp as usual."""
    layer = LayerBuilder()
    layer.dir("bin")
    layer.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    layer.dir("tmp", mode=0o1777)
    return layer


def build_simple_image(layout_dir: Path, files: dict[str, bytes], *, tag: str = "latest",
                       cmd: list[str] | None = None, compression: str = "gzip") -> OciImage:
    """A busybox layer plus one layer holding `files` (relative paths; parents made 0755)."""
    layer, dirs = LayerBuilder(), set()
    for name in sorted(files):
        parts = name.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in dirs:
                dirs.add(parent)
                layer.dir(parent)
        layer.file("/".join(parts), files[name])
    return write_oci_image(layout_dir, [busybox_layer().tar_bytes(), layer.tar_bytes()], tag=tag, cmd=cmd,
                           compression=compression)


# ---- the corner-case image -------------------------------------------------------------------

LONG_NAME = "long/" + "n" * 150  # > 100 bytes: PAX path / GNU 'L'
DEEP_DIRS = ["long/deep"] + ["long/deep/" + "/".join(f"seg-{j:02d}-" + "x" * 50 for j in range(i + 1)) for i in range(5)]
DEEP_FILE = DEEP_DIRS[-1] + "/leaf.txt"  # path > 255 bytes
GNU_LONG_NAME = "gnu/" + "g" * 180
# What later layers remove or hide: none of these may be in the final tree.
# mtimes outside what containerd keeps (int64 ns since 1970): it applies the epoch, umoci others.
OUT_OF_RANGE_MTIMES = ("/files/mtime-negative", "/gnu/mtime-2514")
REMOVED = ("/victims/file", "/victims/dir", "/root-victim", "/opaque/old-dir", "/ünïcødé/日本語.txt")
ENTRYPOINT_OUTPUT = "corner-case image ok"


def _base_layer(chunk: int) -> LayerBuilder:
    rnd = random.Random(1234)
    layer = busybox_layer()
    layer.dir("usr")
    layer.dir("usr/bin")
    layer.symlink("usr/bin/env", "/bin/busybox")
    layer.dir("files", mode=0o750, uid=1000, gid=1000)
    for size in (0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 7):
        layer.file(f"files/size-{size}", rnd.randbytes(size))
    layer.file("files/random-2.5M", rnd.randbytes(5 * (1 << 19) + 13))
    layer.file("files/text.txt", b"the quick brown fox jumps over the lazy dog\n" * 50_000, mode=0o640)
    layer.file("files/setuid", b"#!/bin/sh\n", mode=0o4755)
    layer.file("files/setgid", b"#!/bin/sh\n", mode=0o2755)
    layer.file("files/sticky", b"sticky", mode=0o1644)
    layer.file("files/mode-0000", b"nobody may read me", mode=0o000)
    layer.file("files/owned-1000", b"owner", uid=1000, gid=1000, uname="user", gname="user")
    layer.file("files/nobody", b"nobody", uid=65534, gid=65534, uname="nobody", gname="nogroup")
    layer.file("files/big-ids", b"ids need PAX", uid=3_000_000, gid=2_500_000)  # > 8**7: PAX uid/gid records
    layer.file("files/mtime-epoch", b"1970", mtime=0)
    layer.file("files/mtime-2242", b"far future", mtime=2**33)  # needs a PAX mtime record
    layer.file("files/mtime-fraction", b"fraction", mtime=1_234_567_890.75)
    layer.file("files/mtime-negative", b"before 1970", mtime=-86_400)
    layer.file("files/xattrs", b"has xattrs", pax_headers={"SCHILY.xattr.user.foo": "bar", "SCHILY.xattr.user.empty": ""})
    layer.file("files/name with spaces.txt", b"spaces")
    layer.file("files/-dash 'quote' \"double\"", b"shell-hostile name")
    layer.dir("dirs")
    for mode in (0o700, 0o555, 0o2775, 0o1777, 0o000):
        layer.dir(f"dirs/mode-{mode:04o}", mode=mode, uid=1000 if mode == 0o700 else 0)
        layer.file(f"dirs/mode-{mode:04o}/inside", b"inside")
    layer.dir("dirs/empty")
    layer.dir("ünïcødé")
    layer.file("ünïcødé/日本語.txt", "日本語のテキスト".encode())
    layer.file("ünïcødé/🚀 emoji ✨.bin", "🚀".encode() * 1000)
    layer.dir("long")
    layer.file(LONG_NAME, rnd.randbytes(chunk + 3))
    for d in DEEP_DIRS:
        layer.dir(d)
    layer.file(DEEP_FILE, b"deep down")
    layer.dir("links")
    layer.symlink("links/rel", "../files/text.txt")
    layer.symlink("links/abs", "/files/text.txt")
    layer.symlink("links/dangling", "/nowhere/at/all")
    layer.symlink("links/to-dir", "../dirs")
    layer.symlink("links/loop", "loop")
    layer.symlink("links/long-target", "/" + "t" * 120 + "/" + "u" * 120)  # PAX linkpath
    layer.dir("hardlinks")
    layer.file("hardlinks/orig", b"one inode, several names")
    layer.hardlink("hardlinks/same-dir", "hardlinks/orig")
    layer.hardlink("hardlinks/across-dirs", "files/text.txt")
    layer.hardlink("hardlinks/to-setuid", "files/setuid")
    layer.hardlink("hardlinks/to-long-name", LONG_NAME)  # linkname > 100 bytes
    layer.dir("devices")
    layer.device("devices/char-1-3", tarfile.CHRTYPE, 1, 3, mode=0o666)
    layer.device("devices/block-7-0", tarfile.BLKTYPE, 7, 0)
    layer.device("devices/char-big", tarfile.CHRTYPE, 250, 70_000)
    layer.fifo("devices/fifo")
    layer.dir("victims")
    layer.file("victims/file", b"deleted later")
    layer.file("victims/keep", b"stays")
    layer.dir("victims/dir")
    layer.dir("victims/dir/sub")
    layer.file("victims/dir/sub/deep", b"deleted with its dir")
    layer.file("root-victim", b"deleted later")
    layer.dir("opaque", mode=0o775)
    layer.file("opaque/old-a", b"hidden by the opaque marker")
    layer.dir("opaque/old-dir")
    layer.file("opaque/old-dir/x", b"hidden too")
    layer.file("file-becomes-dir", b"i was a file")
    layer.dir("dir-becomes-file")
    layer.file("dir-becomes-file/child", b"i was in a dir")
    layer.dir("changes")
    layer.file("changes/content", b"version 1")
    layer.file("changes/mode-only", b"same bytes, new mode and owner")
    layer.symlink("changes/link-becomes-file", "/files/text.txt")
    return layer


def _gnu_layer(chunk: int) -> LayerBuilder:
    layer = LayerBuilder(tarfile.GNU_FORMAT)  # long names as 'L'/'K' blocks, big numbers base-256
    layer.dir("victims")
    layer.whiteout("victims/file")
    layer.whiteout("victims/dir")
    layer.whiteout("root-victim")
    layer.dir("opaque", mode=0o775)
    layer.opaque("opaque")
    layer.file("opaque/new", b"only me and old-a after the opaque marker")
    layer.file("opaque/old-a", b"re-added in the opaque layer")  # same-layer entries survive the marker
    layer.dir("file-becomes-dir", mode=0o700)
    layer.file("file-becomes-dir/child", b"child")
    layer.file("dir-becomes-file", b"now a file")
    layer.dir("changes")
    layer.file("changes/content", b"version 2, longer than before", mode=0o600)
    layer.file("changes/link-becomes-file", b"a file now")
    layer.dir("gnu")
    layer.file(GNU_LONG_NAME, random.Random(2).randbytes(chunk // 2))
    layer.symlink("gnu/long-link", "/" + "k" * 200)
    layer.hardlink("gnu/hardlink-to-long", GNU_LONG_NAME)
    layer.file("gnu/huge-uid", b"base-256 uid", uid=4_000_000, gid=4_000_001)
    layer.file("gnu/mtime-2514", b"base-256 mtime", mtime=2**34)
    return layer


def _third_layer(chunk: int, global_pax_header: bool) -> LayerBuilder:
    layer = LayerBuilder(tarfile.PAX_FORMAT, global_pax={"comment": "a global PAX header"} if global_pax_header else None)
    layer.dir("files", mode=0o755)  # metadata of an existing directory changes, its children stay
    layer.dir("changes")
    layer.file("changes/mode-only", b"same bytes, new mode and owner", mode=0o755, uid=1000, gid=1000)
    layer.dir("ünïcødé")
    layer.whiteout("ünïcødé/日本語.txt")
    layer.dir("third")
    layer.file("third/own", random.Random(3).randbytes(2 * chunk))
    layer.hardlink("third/hardlink", "third/own")
    return layer


def corner_case_layer_tars(chunk_size: int = CHUNK, global_pax_header: bool = True) -> list[bytes]:
    """The uncompressed tar of each corner-case layer, bottom first: PAX, GNU, PAX with a global header.

    `global_pax_header=False` leaves out the 'g' header, which umoci 0.4.7 cannot unpack.
    """
    layers = [_base_layer(chunk_size), _gnu_layer(chunk_size), _third_layer(chunk_size, global_pax_header)]
    return [layer.tar_bytes() for layer in layers]


def build_corner_case_image(layout_dir: Path, chunk_size: int = CHUNK, tag: str = "latest",
                            global_pax_header: bool = True) -> OciImage:
    return write_oci_image(layout_dir, corner_case_layer_tars(chunk_size, global_pax_header), tag=tag,
                           entrypoint=["/bin/busybox", "sh", "-c"], cmd=[f"echo {ENTRYPOINT_OUTPUT}"])
