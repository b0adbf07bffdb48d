"""Build the benchmarks' realistic images once, as OCI layouts cached until deleted.

* small (`build_realistic_image`): Debian 12 + a Python venv with the PyTorch 2.13.0 CPU wheel;
  two gzip layers (the base system, then /opt/venv), about 1.15 GB.
* large (`build_large_image`): Debian 12 + a venv with the CUDA build of torch 2.14.1 (and its
  nvidia-* wheels) + an incompressible weights file the entrypoint reads whole after
  `import torch`; three layers packed with GNU tar + pigz (umoci insert cuts multi-GB layers
  short), about 8 GB with the default 2 GiB of weights.

pip cannot verify certificates inside the chroot, so wheels are downloaded on the host and
installed in the chroot from a local directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TORCH = "torch==2.13.0"
LARGE_TORCH = "torch==2.14.1"  # a CUDA build with its nvidia-* wheels; pip takes them from this machine's disk
# the wheel tags Debian 12 (glibc 2.36, x86_64) runs; the CUDA wheels come in several of them
MANYLINUX = (*(f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)), "manylinux2014_x86_64",
             "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64")
MIRROR = "http://deb.debian.org/debian"
TAG = "latest"


def say(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs: object) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"bench: `{' '.join(cmd[:4])} …` failed: {result.stderr.strip()[-600:]}")


def download_wheels(requirement: str, wheels: Path) -> list[Path]:
    """`pip download` of `requirement` and its dependencies for the image's Python (3.11, x86_64)."""
    say(f"downloading {requirement} and its dependencies on the host")
    platforms = [a for tag in MANYLINUX for a in ("--platform", tag)]  # pip takes exactly the tags it is given
    run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
         *platforms, "-d", str(wheels), requirement], timeout=3600)
    return sorted(wheels.glob("*.whl"))


def _rootfs(cache: Path, torch: str = TORCH) -> Path:
    rootfs = cache / "rootfs"
    if (cache / "rootfs.done").exists():
        return rootfs
    shutil.rmtree(rootfs, ignore_errors=True)
    say("debootstrap bookworm (minbase + python3) — a few minutes")
    run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs),
         MIRROR], timeout=1800)
    wheels = cache / "wheels"
    download_wheels(torch, wheels)
    say("creating /opt/venv in the chroot and installing the wheels there")
    inside = rootfs / "tmp" / "wheels"
    shutil.copytree(wheels, inside, dirs_exist_ok=True)
    run(["chroot", str(rootfs), "python3", "-m", "venv", "/opt/venv"], timeout=600)
    run(["chroot", str(rootfs), "/opt/venv/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheels", torch],
        timeout=3600)
    shutil.rmtree(inside)
    for cache_dir in (rootfs / "var/cache/apt/archives", rootfs / "root/.cache"):
        shutil.rmtree(cache_dir, ignore_errors=True)
    (cache / "rootfs.done").touch()
    return rootfs


def _tar(rootfs: Path, members: list[str], excludes: list[str]) -> subprocess.Popen[bytes]:
    """GNU tar (PAX, sorted, numeric owners) of `members` to a pipe."""
    return subprocess.Popen(["tar", "-C", str(rootfs), "--format=pax", "--sort=name", "--numeric-owner",
                             "--xattrs", *[f"--exclude={e}" for e in excludes], "-cf", "-", *members],
                            stdout=subprocess.PIPE)


def _tar_gz_layer(rootfs: Path, members: list[str], excludes: list[str], out: Path) -> tuple[str, int]:
    """tar | gzip -6 into `out`; returns (diff_id, uncompressed bytes)."""
    tar = _tar(rootfs, members, excludes)
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


def _tar_pigz_layer(rootfs: Path, members: list[str], excludes: list[str], out: Path) -> tuple[str, int]:
    """tar | pigz -6 -n into `out` (multi-GB layers: parallel gzip); returns (diff_id, uncompressed bytes)."""
    if shutil.which("pigz") is None:
        raise SystemExit("bench: pigz not found (apt-get install pigz, or run scripts/setup.sh)")
    tar = _tar(rootfs, members, excludes)
    digest, size = hashlib.sha256(), 0
    assert tar.stdout is not None
    with open(out, "wb") as raw:
        pigz = subprocess.Popen(["pigz", "-6", "-n", "-c"], stdin=subprocess.PIPE, stdout=raw)
        assert pigz.stdin is not None
        while block := tar.stdout.read(1 << 20):
            digest.update(block)
            size += len(block)
            pigz.stdin.write(block)
        pigz.stdin.close()
        if pigz.wait() != 0 or tar.wait() != 0:
            raise SystemExit("bench: tar | pigz failed while packing a layer")
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


SMALL_CMD = ["/opt/venv/bin/python", "-c", "import torch; print(torch.__version__)"]
WEIGHTS = "/opt/weights/model.bin"
# the first line it prints marks "import done", its exit "weights read"
LARGE_CMD = ["/opt/venv/bin/python", "-W", "ignore", "-c",  # no warning line before "import done"
             "import torch\nprint('import done', torch.__version__, flush=True)\n"
             f"with open('{WEIGHTS}', 'rb') as f:\n    while f.read(1 << 24):\n        pass\n"
             "print('weights read', flush=True)"]


def build_realistic_image(cache: Path) -> tuple[Path, int]:
    """The small image's OCI layout (built if missing) and the uncompressed bytes of its layers."""
    layout = cache / "layout"
    meta = cache / "layout.json"
    if meta.exists():
        return layout, int(json.loads(meta.read_text())["uncompressed_bytes"])
    cache.mkdir(parents=True, exist_ok=True)
    rootfs = _rootfs(cache)
    layers = [("base", rootfs, ["."], ["./opt/venv"]), ("venv", rootfs, ["./opt/venv"], [])]
    return _write_layout(layout, meta, layers, SMALL_CMD, _tar_gz_layer)


def _weights(root: Path, mib: int) -> Path:
    """`root` holding WEIGHTS: `mib` MiB of random (incompressible) bytes."""
    if (root.parent / f"{root.name}.done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    target = root / WEIGHTS.lstrip("/")
    target.parent.mkdir(parents=True)
    say(f"writing {mib} MiB of random weights")
    with open(target, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    (root.parent / f"{root.name}.done").touch()
    return root


def build_large_image(cache: Path, weights_mib: int = 2048) -> tuple[Path, int]:
    """The large image's OCI layout (built if missing; one per weights size) and its uncompressed bytes."""
    layout = cache / f"layout-w{weights_mib}"
    meta = cache / f"layout-w{weights_mib}.json"
    if meta.exists():
        return layout, int(json.loads(meta.read_text())["uncompressed_bytes"])
    cache.mkdir(parents=True, exist_ok=True)
    rootfs = _rootfs(cache, LARGE_TORCH)
    weights = _weights(cache / f"weights-{weights_mib}", weights_mib)
    layers = [("base", rootfs, ["."], ["./opt/venv"]), ("venv", rootfs, ["./opt/venv"], []),
              ("weights", weights, ["./opt"], [])]
    return _write_layout(layout, meta, layers, LARGE_CMD, _tar_pigz_layer)


Packer = Callable[[Path, list[str], list[str], Path], tuple[str, int]]


def _write_layout(layout: Path, meta: Path, parts: list[tuple[str, Path, list[str], list[str]]], cmd: list[str],
                  pack: Packer) -> tuple[Path, int]:
    started = time.monotonic()
    shutil.rmtree(layout, ignore_errors=True)
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers, diff_ids, total = [], [], 0
    for name, root, members, excludes in parts:
        say(f"packing layer {name} ({pack.__name__})")
        diff_id, size = pack(root, members, excludes, layout / f"{name}.tar.gz")
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, layout / f"{name}.tar.gz")})
        diff_ids.append(diff_id)
        total += size
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"], "Cmd": cmd},
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
