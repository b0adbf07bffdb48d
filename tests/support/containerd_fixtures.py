"""containerd fixture: a private containerd per test, under the test's temp dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpull.embedded.containerd import EmbeddedContainerd


def containerd_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[EmbeddedContainerd]:
    reason = containerd_missing()
    if reason:
        pytest.skip(reason)
    # a short path: containerd's unix socket paths are limited to ~108 bytes
    root = Path(os.environ.get("PEERPULL_TEST_RUNDIR", "/run")) / f"pp-ctd-{os.getpid()}-{tmp_path.name[-20:]}"
    with EmbeddedContainerd(root) as ctrd:
        yield ctrd
    shutil.rmtree(root, ignore_errors=True)
