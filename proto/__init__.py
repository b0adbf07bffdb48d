"""Protocol buffer definitions (containerd's snapshots, content, images, diff and leases APIs, and
the CRI image service) and their generated Python modules. Imported as `peerpull_proto`: the
top-level name `proto` belongs to proto-plus.

A leaf: it imports nothing of peerpull. The modules are generated with grpcio-tools into the Python
environment's own directory (`<sys.prefix>/var/peerpull-proto/<hash of the sources>`), once, at
install time (`python -m peerpull_proto`, which scripts/setup.sh runs) or else on first use; the
hash means an edited .proto is never served stale. Nothing is written into the source tree or $HOME,
and nothing generated is committed.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

SOURCE_DIR = Path(__file__).resolve().parent
PROTOS = (
    "containerd/types/mount.proto",
    "containerd/types/descriptor.proto",
    "containerd/services/snapshots/v1/snapshots.proto",
    "containerd/services/content/v1/content.proto",
    "containerd/services/images/v1/images.proto",
    "containerd/services/diff/v1/diff.proto",
    "containerd/services/leases/v1/leases.proto",
    "cri/runtime/v1/api.proto",
)


class ProtoGenerationError(RuntimeError):
    """The modules could not be generated (grpcio-tools missing, or nowhere writable)."""


def _sources_hash() -> str:
    h = hashlib.sha256()
    for name in PROTOS:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def cache_roots() -> list[Path]:
    """Where generated modules may live, preferred first: $PEERPULL_PROTO_CACHE, else the environment's
    own var/ directory, else a per-user temp directory (a read-only environment)."""
    override = os.environ.get("PEERPULL_PROTO_CACHE")
    if override:
        return [Path(override)]
    return [Path(sys.prefix) / "var" / "peerpull-proto", Path(tempfile.gettempdir()) / f"peerpull-proto-{os.getuid()}"]


def _generate(out: Path) -> None:
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        raise ProtoGenerationError("grpcio-tools is not installed: reinstall peerpull (pip install -e .)") from None
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out.parent))
    args = ["protoc", f"-I{SOURCE_DIR}", f"-I{include}", f"--python_out={staging}", f"--grpc_python_out={staging}",
            *[str(SOURCE_DIR / p) for p in PROTOS]]
    if protoc.main(args) != 0:
        raise ProtoGenerationError(f"protoc failed on {SOURCE_DIR}")
    for directory in [d for d in staging.rglob("*") if d.is_dir()]:
        (directory / "__init__.py").touch()
    try:
        os.rename(staging, out)  # atomic: a concurrent process either sees all of it or none
    except OSError:
        if not out.exists():
            raise


def generated_dir() -> Path:
    """Where the generated modules of the current .proto sources are (generating them if needed)."""
    tag = _sources_hash()
    errors = []
    for root in cache_roots():
        out = root / tag
        if (out / "containerd").is_dir():
            return out
        try:
            root.mkdir(parents=True, exist_ok=True)
            _generate(out)
            return out
        except OSError as exc:
            errors.append(f"{root}: {exc}")
    raise ProtoGenerationError("cannot write generated protobuf modules anywhere: " + "; ".join(errors))


def load(module: str) -> ModuleType:
    """Import a generated module, e.g. load("containerd.services.snapshots.v1.snapshots_pb2")."""
    out = str(generated_dir())
    if out not in sys.path:
        sys.path.insert(0, out)
    return importlib.import_module(module)
