"""Image fixtures: the corner-case image as an OCI layout, and pushed to a registry with skopeo."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.corner_image import build_corner_case_layout


def push_layout(layout: Path, address: str, repo: str, tag: str = "latest") -> str:
    """Copy an OCI layout into a registry with skopeo (layers pushed as they are, not recompressed)."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    ref = f"{address}/{repo}:{tag}"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{ref}"],
                   check=True, capture_output=True, timeout=300)
    return ref


@pytest.fixture(scope="session")
def corner_case_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corner") / "layout"
    build_corner_case_layout(root)
    return root
