"""containerd fixture: a private containerd per test, under the test's temp dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import ContainerdProcess


def containerd_missing() -> str | None:
    """Why a real containerd cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (containerd, runc and overlay mounts)"
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[ContainerdProcess]:
    reason = containerd_missing()
    if reason:
        pytest.skip(reason)
    # PEERPULL_TEST_RUNDIR: a place for containerd's root when the temp dir cannot hold overlay
    # upper dirs (e.g. /tmp itself on overlayfs).
    base = Path(os.environ["PEERPULL_TEST_RUNDIR"]) / tmp_path.name if "PEERPULL_TEST_RUNDIR" in os.environ else tmp_path
    with ContainerdProcess(base / "containerd") as ctrd:
        yield ctrd
    if base != tmp_path:
        shutil.rmtree(base, ignore_errors=True)
