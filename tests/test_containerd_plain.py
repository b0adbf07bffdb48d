"""A converted image runs on a plain containerd (overlayfs snapshotter, no peerpull) unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.containerd import ContainerdProcess, pull_image, run_container
from tests.support.image_fixtures import push_layout
from tests.support.images import CHUNK, ENTRYPOINT_OUTPUT, REMOVED
from tests.support.tree import container_tree


def test_plain_containerd_runs_the_converted_image_with_the_same_tree(
    containerd: ContainerdProcess, registry, corner_case_layout: Path
) -> None:
    original = push_layout(corner_case_layout, registry.address, "corner/original")
    converted = f"{registry.address}/corner/seekable:1"
    subprocess.run([sys.executable, "-m", "peerpull", "convert", "--quiet", original, converted, "--chunk-size", str(CHUNK)],
                   check=True, capture_output=True, timeout=300)
    for ref in (original, converted):
        pull_image(containerd, ref)
    before = container_tree(containerd, original)
    after = container_tree(containerd, converted)
    assert after == before
    # the corner cases really are in the tree containerd assembled
    assert not any(path in after for path in REMOVED)
    assert "/victims/keep" in after and "/opaque/new" in after
    assert after["/devices/char-1-3"].rdev == (1, 3) and after["/devices/fifo"].kind == "fifo"
    assert after["/files/setuid"].mode == "4755"
    assert after["/hardlinks/across-dirs"].nlink == 2
    assert ENTRYPOINT_OUTPUT in run_container(containerd, converted, [])
