"""Image fixtures: test images as OCI layouts, and pushing a layout to a registry with skopeo."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import images


def push_layout(layout: Path, address: str, repo: str, tag: str = "latest") -> str:
    """images.push_layout, skipping the test when skopeo is missing."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    return images.push_layout(layout, address, repo, tag)


@pytest.fixture(scope="session")
def corner_case_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of the corner-case image's OCI layout (tag "latest")."""
    root = tmp_path_factory.mktemp("corner") / "layout"
    images.build_corner_case_image(root)
    return root


@pytest.fixture(scope="session")
def corner_case_image(tmp_path_factory: pytest.TempPathFactory) -> images.OciImage:
    """The corner-case image of tests/support/images.py (chunk size images.CHUNK), tag "latest"."""
    return images.build_corner_case_image(tmp_path_factory.mktemp("corner-case") / "layout")
