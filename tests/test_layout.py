"""The house rules that hold the layout together: imports point one way only
(converter ← peer ← snapshotter ← peerpull, proto a leaf), runtime packages never load the
build-time conversion pipeline, and the protobuf package does not clash with proto-plus."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"converter": 0, "peer": 1, "snapshotter": 2, "peerpull": 3}
PACKAGES = {**{name: ROOT / name for name in RANK}, "peerpull_proto": ROOT / "proto"}
# the runtime base: what a node daemon loads; conversion is build time only
RUNTIME = ("converter.format", "converter.registry", "peer", "snapshotter")


def _module_name(path: Path) -> str:
    package = next(name for name, root in PACKAGES.items() if root in path.parents)
    rel = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [package, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module this file imports (top-level or inside functions), absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
            found.append((node.lineno, node.module))
    return found


def _sources() -> list[Path]:
    out = []
    for root in PACKAGES.values():
        out += [p for p in root.rglob("*.py") if "_generated" not in p.parts]
    return sorted(out)


def test_imports_point_one_way_only() -> None:
    wrong = []
    for path in _sources():
        me = _module_name(path)
        top = me.split(".")[0]
        for line, name in _imports(path):
            target = name.split(".")[0]
            if top == "peerpull_proto":
                if target in RANK:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} proto must be a leaf, imports {name}")
            elif target in RANK and RANK[target] > RANK[top]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} {me} imports {name} (points the wrong way)")
            if any(me == r or me.startswith(r + ".") for r in RUNTIME) and name.startswith("converter.conversion"):
                wrong.append(f"{path.relative_to(ROOT)}:{line} runtime module {me} imports build-time {name}")
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_every_package() -> None:
    names = {_module_name(p) for p in _sources()}
    for expected in ("converter.format.toc", "converter.registry.client", "converter.conversion.convert",
                     "peer.fetcher", "snapshotter.fs.fusefs", "snapshotter.service.grpc_service",
                     "snapshotter.containerd.pull", "peerpull.daemon", "peerpull.testbed.runner", "peerpull_proto"):
        assert expected in names, expected
    # and it would catch a wrong-way import: the app's modules import the libraries
    assert any(name.startswith("snapshotter") for _, name in _imports(ROOT / "peerpull" / "daemon.py"))


def test_a_top_level_proto_package_of_another_distribution_does_not_clash(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "proto"  # what proto-plus installs
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("PROTO_PLUS = True\n")
    code = ("import proto, peerpull_proto; assert proto.PROTO_PLUS; "
            "import snapshotter.service.grpc_service as s; print(s.pb_grpc.__name__)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "snapshots_pb2_grpc" in result.stdout


def test_generated_modules_live_in_the_environment_not_the_source_tree() -> None:
    import peerpull_proto

    out = peerpull_proto.generated_dir()
    assert ROOT not in out.parents and Path.home() not in out.parents or Path(sys.prefix) in out.parents
    assert not (ROOT / "proto" / "_generated").exists()
