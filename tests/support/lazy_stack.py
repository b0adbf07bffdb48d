"""A whole node on one machine for integration tests: a registry, a `peerpull daemon` process and
a private containerd whose `peerpull` proxy snapshotter is that daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peerpull.testbed.daemon import EmbeddedDaemon
from peerpull.testbed.registry import EmbeddedRegistry
from tests.support.containerd import NAMESPACE, ContainerdProcess
from tests.support.containerd_fixtures import containerd_missing


@dataclass
class LazyStack:
    root: Path
    registry: EmbeddedRegistry
    daemon: EmbeddedDaemon
    containerd: ContainerdProcess

    def peerpull(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"peerpull {' '.join(args)} failed ({result.returncode}): {result.stderr[-3000:]}"
                                 f"\ndaemon log: {self.daemon.log_tail()}")
        return result

    def pull(self, image: str) -> dict:
        out = self.peerpull("pull", image, "--address", str(self.containerd.socket), "--namespace", NAMESPACE, "--json")
        return json.loads(out.stdout)

    def convert(self, source: str, target: str, chunk_size: int, *extra: str) -> None:
        self.peerpull("convert", source, target, "--chunk-size", str(chunk_size), "--quiet", *extra)


def fuse_missing() -> str | None:
    reason = containerd_missing()
    if reason:
        return reason
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing"
    return None


@pytest.fixture(scope="module")
def lazy_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LazyStack]:
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("lazy")
    with EmbeddedRegistry(root / "registry") as registry, EmbeddedDaemon(root / "daemon") as daemon:
        with ContainerdProcess(root / "containerd", proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
            yield LazyStack(root, registry, daemon, ctrd)
