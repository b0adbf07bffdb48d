"""Build the benchmarks' realistic image once: Debian 12 + a Python venv with the PyTorch CPU wheel.

Two gzip layers (the base system, then /opt/venv), written as an OCI layout in the cache dir and
reused until it is deleted. pip cannot verify certificates inside the chroot, so wheels are
downloaded on the host and installed in the chroot from a local directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

TORCH = "torch==2.13.0"
MIRROR = "http://deb.debian.org/debian"
TAG = "latest"


def say(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs: object) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"bench: `{' '.join(cmd[:4])} …` failed: {result.stderr.strip()[-600:]}")


def _rootfs(cache: Path) -> Path:
    rootfs = cache / "rootfs"
    if (cache / "rootfs.done").exists():
        return rootfs
    shutil.rmtree(rootfs, ignore_errors=True)
    say("debootstrap bookworm (minbase + python3) — a few minutes")
    run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs),
         MIRROR], timeout=1800)
    wheels = cache / "wheels"
    say(f"downloading {TORCH} and its dependencies on the host")
    run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
         "--platform", "manylinux_2_28_x86_64", "-d", str(wheels), TORCH], timeout=1800)
    say("creating /opt/venv in the chroot and installing the wheels there")
    inside = rootfs / "tmp" / "wheels"
    shutil.copytree(wheels, inside, dirs_exist_ok=True)
    run(["chroot", str(rootfs), "python3", "-m", "venv", "/opt/venv"], timeout=600)
    run(["chroot", str(rootfs), "/opt/venv/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels", TORCH],
        timeout=1800)
    shutil.rmtree(inside)
    for cache_dir in (rootfs / "var/cache/apt/archives", rootfs / "root/.cache"):
        shutil.rmtree(cache_dir, ignore_errors=True)
    (cache / "rootfs.done").touch()
    return rootfs


def _tar_gz_layer(rootfs: Path, members: list[str], excludes: list[str], out: Path) -> tuple[str, int]:
    """tar (PAX, sorted, numeric owners) | gzip -6 into `out`; returns (diff_id, uncompressed bytes)."""
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--format=pax", "--sort=name", "--numeric-owner",
                            "--xattrs", *[f"--exclude={e}" for e in excludes], "-cf", "-", *members],
                           stdout=subprocess.PIPE)
    digest, size = hashlib.sha256(), 0
    assert tar.stdout is not None
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        while block := tar.stdout.read(1 << 20):
            digest.update(block)
            size += len(block)
            gz.write(block)
    if tar.wait() != 0:
        raise SystemExit("bench: tar failed while packing a layer")
    return "sha256:" + digest.hexdigest(), size


def _blob(layout: Path, path: Path) -> dict[str, object]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    target = layout / "blobs" / "sha256" / digest.hexdigest()
    target.parent.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size
    path.replace(target)
    return {"digest": "sha256:" + digest.hexdigest(), "size": size}


def _json_blob(layout: Path, data: dict[str, object]) -> dict[str, object]:
    tmp = layout / "tmp.json"
    tmp.write_bytes(json.dumps(data).encode())
    return _blob(layout, tmp)


def build_realistic_image(cache: Path) -> tuple[Path, int]:
    """The OCI layout (built if missing) and the uncompressed bytes of its layers."""
    layout = cache / "layout"
    meta = cache / "layout.json"
    if meta.exists():
        return layout, int(json.loads(meta.read_text())["uncompressed_bytes"])
    cache.mkdir(parents=True, exist_ok=True)
    rootfs = _rootfs(cache)
    started = time.monotonic()
    shutil.rmtree(layout, ignore_errors=True)
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers, diff_ids, total = [], [], 0
    for name, members, excludes in (("base", ["."], ["./opt/venv"]), ("venv", ["./opt/venv"], [])):
        say(f"packing layer {name} (tar | gzip -6)")
        diff_id, size = _tar_gz_layer(rootfs, members, excludes, layout / f"{name}.tar.gz")
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, layout / f"{name}.tar.gz")})
        diff_ids.append(diff_id)
        total += size
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"],
                         "Cmd": ["/opt/venv/bin/python", "-c", "import torch; print(torch.__version__)"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **_json_blob(layout, config)},
                "layers": layers}
    manifest_desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **_json_blob(layout, manifest),
                     "annotations": {"org.opencontainers.image.ref.name": TAG}}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))
    meta.write_text(json.dumps({"uncompressed_bytes": total}))
    say(f"image ready: {total / 1e9:.2f} GB uncompressed, packed in {time.monotonic() - started:.0f} s")
    return layout, total
