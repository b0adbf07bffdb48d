"""Write OCI image layouts from in-memory tar layers: sample images for the demo, tests and benchmarks.

Deterministic: gzip with mtime 0 and a fixed level, JSON with fixed key order.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.format.digest import sha256_digest
from converter.registry import media_types as mt

FIXED_MTIME = 1_700_000_000


@dataclass
class LayerSpec:
    """Tar members of one layer; `tar_format` is a tarfile format constant."""

    members: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)
    tar_format: int = tarfile.PAX_FORMAT
    global_pax: dict[str, str] | None = None

    def add(self, name: str, data: bytes | None = None, **attrs: Any) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.mtime = FIXED_MTIME
        info.mode = 0o755 if attrs.get("type") == tarfile.DIRTYPE else 0o644
        for key, value in attrs.items():
            setattr(info, key, value)
        if data is not None:
            info.size = len(data)
        self.members.append((info, data))
        return info

    def tar_bytes(self) -> bytes:
        buf = io.BytesIO()
        kwargs: dict[str, Any] = {"format": self.tar_format}
        if self.global_pax:
            kwargs["pax_headers"] = self.global_pax
        with tarfile.open(fileobj=buf, mode="w", **kwargs) as tf:
            for info, data in self.members:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def _write_blob(root: Path, data: bytes) -> dict[str, Any]:
    digest = sha256_digest(data)
    path = root / "blobs" / "sha256" / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def write_layout(root: Path, layers: Iterable[bytes], tag: str = "latest", cmd: list[str] | None = None,
                 env: list[str] | None = None, gzip_level: int = 6) -> str:
    """Write an OCI layout holding one linux/amd64 image of gzip layers; returns the manifest digest."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descriptors, diff_ids = [], []
    for tar in layers:
        diff_ids.append(sha256_digest(tar))
        blob = gzip.compress(tar, compresslevel=gzip_level, mtime=0)
        descriptors.append({"mediaType": mt.OCI_LAYER_GZIP, **_write_blob(root, blob)})
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd or ["/bin/sh"], "Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin:/sbin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_desc = {"mediaType": mt.OCI_CONFIG, **_write_blob(root, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": config_desc, "layers": descriptors}
    manifest_desc = {"mediaType": mt.OCI_MANIFEST, **_write_blob(root, json.dumps(manifest).encode()),
                     "annotations": {"org.opencontainers.image.ref.name": tag}}
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [manifest_desc]}
    (root / "index.json").write_text(json.dumps(index))
    return str(manifest_desc["digest"])
