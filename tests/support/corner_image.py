"""A test image whose layers hold every tar corner case the converter and snapshotter must get right."""

from __future__ import annotations

import random
import tarfile
from pathlib import Path

from peerpull.embedded.oci_layout import LayerSpec, write_layout

CHUNK = 64 * 1024  # tests convert with this chunk size so that boundaries are cheap to hit
LONG_DIR = "deep/" + "/".join(f"level-{i:02d}-" + "d" * 40 for i in range(6))  # > 255 bytes
UNICODE_DIR = "ünïcødé/日本語"


def _base_layer() -> LayerSpec:
    rnd = random.Random(42)
    layer = LayerSpec(tar_format=tarfile.PAX_FORMAT)
    d = tarfile.DIRTYPE
    layer.add("bin", type=d)
    layer.add("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    layer.add("bin/sh", type=tarfile.SYMTYPE, linkname="busybox")
    layer.add("tmp", type=d, mode=0o1777)
    layer.add("files", type=d, mode=0o750, uid=1000, gid=1000)
    for size in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7):
        layer.add(f"files/size-{size}", rnd.randbytes(size))
    layer.add("files/random-2.5M", rnd.randbytes(5 * (1 << 19)))
    layer.add("files/text", b"the quick brown fox\n" * 20000, mode=0o640)
    layer.add("files/setuid", b"#!/bin/sh\n", mode=0o4755)
    layer.add("files/setgid", b"#!/bin/sh\n", mode=0o2755)
    layer.add("files/sticky-dir", type=d, mode=0o1777)
    layer.add("files/owned", b"owner", uid=65534, gid=65534, uname="nobody", gname="nogroup")
    layer.add("files/big-ids", b"ids", uid=2_000_000, gid=3_000_000)
    layer.add("files/old-mtime", b"old", mtime=86400)
    layer.add("files/xattr", b"has xattrs", pax_headers={"SCHILY.xattr.user.peerpull": "yes", "SCHILY.xattr.user.empty": ""})
    layer.add("files/name with spaces", b"spaces")
    layer.add("ünïcødé", type=d)
    layer.add(UNICODE_DIR, type=d)
    layer.add(f"{UNICODE_DIR}/ファイル ✓ 🚀.txt", "unicode content ✓".encode())
    path = ""
    for part in LONG_DIR.split("/"):
        path = f"{path}/{part}" if path else part
        layer.add(path, type=d)
    layer.add(f"{LONG_DIR}/" + "f" * 120 + ".bin", rnd.randbytes(CHUNK + 3))
    layer.add("links", type=d)
    layer.add("links/rel", type=tarfile.SYMTYPE, linkname="../files/text")
    layer.add("links/abs", type=tarfile.SYMTYPE, linkname="/files/text")
    layer.add("links/dangling", type=tarfile.SYMTYPE, linkname="/does/not/exist")
    layer.add("links/long-target", type=tarfile.SYMTYPE, linkname="/" + "t" * 150 + "/" + "u" * 150)
    layer.add("links/hard-same-dir", type=tarfile.LNKTYPE, linkname="files/size-1")
    layer.add("hardlinks", type=d)
    layer.add("hardlinks/across", type=tarfile.LNKTYPE, linkname="files/text")
    layer.add("hardlinks/to-long", type=tarfile.LNKTYPE, linkname=f"{LONG_DIR}/" + "f" * 120 + ".bin")
    layer.add("devices", type=d)
    layer.add("devices/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    layer.add("devices/loop0", type=tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660)
    layer.add("devices/fifo", type=tarfile.FIFOTYPE, mode=0o644)
    # things later layers delete, hide or replace
    layer.add("victims", type=d)
    layer.add("victims/file", b"deleted later")
    layer.add("victims/keep", b"stays")
    layer.add("victims/dir", type=d)
    layer.add("victims/dir/inner", b"deleted with its dir")
    layer.add("opaque", type=d)
    layer.add("opaque/old-a", b"hidden by the opaque marker")
    layer.add("opaque/old-dir", type=d)
    layer.add("opaque/old-dir/x", b"hidden too")
    layer.add("file-becomes-dir", b"i was a file")
    layer.add("dir-becomes-file", type=d)
    layer.add("dir-becomes-file/child", b"i was in a dir")
    layer.add("changes", b"version 1", mode=0o644)
    return layer


def _second_layer() -> LayerSpec:
    layer = LayerSpec(tar_format=tarfile.GNU_FORMAT)  # GNU long names ('L'/'K' blocks)
    layer.add("victims", type=tarfile.DIRTYPE)
    layer.add("victims/.wh.file", b"")
    layer.add("victims/.wh.dir", b"")
    layer.add("opaque", type=tarfile.DIRTYPE)
    layer.add("opaque/.wh..wh..opq", b"")
    layer.add("opaque/new", b"only me after the opaque marker")
    layer.add("file-becomes-dir", type=tarfile.DIRTYPE, mode=0o700)
    layer.add("file-becomes-dir/now-a-child", b"child")
    layer.add("dir-becomes-file", b"now a file")
    layer.add("changes", b"version 2, longer than before", mode=0o600)
    layer.add("gnu", type=tarfile.DIRTYPE)
    layer.add("gnu/" + "g" * 180, b"GNU long name")
    layer.add("gnu/long-link", type=tarfile.SYMTYPE, linkname="/" + "k" * 200)
    return layer


def _third_layer() -> LayerSpec:
    layer = LayerSpec(tar_format=tarfile.PAX_FORMAT, global_pax={"comment": "global PAX header"})
    layer.add("third", type=tarfile.DIRTYPE)
    layer.add("third/own", random.Random(3).randbytes(2 * CHUNK))
    layer.add("third/hardlink", type=tarfile.LNKTYPE, linkname="third/own")
    return layer


def corner_case_layers() -> list[bytes]:
    """The uncompressed tar of each layer, bottom first."""
    return [_base_layer().tar_bytes(), _second_layer().tar_bytes(), _third_layer().tar_bytes()]


TREE_SCRIPT = r"""
cd / || exit 1
/bin/busybox find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./etc \) -prune -o -print \
  | /bin/busybox sort | while IFS= read -r p; do
  meta=$(/bin/busybox stat -c '%f|%u|%g|%s|%h|%t|%T' "$p")
  extra=""
  if [ -L "$p" ]; then extra=$(/bin/busybox readlink "$p")
  elif [ -f "$p" ]; then extra=$(/bin/busybox sha256sum "$p" | /bin/busybox cut -d' ' -f1); fi
  echo "$p|$meta|$extra"
done
echo END-OF-TREE
"""


def build_corner_case_layout(root: Path, tag: str = "latest") -> str:
    return write_layout(root, corner_case_layers(), tag=tag, cmd=["/bin/sh", "-c", "echo corner-case image"])
