"""A converted image runs on a plain containerd (overlayfs snapshotter, no peerpull) unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from peerpull.embedded.containerd import EmbeddedContainerd
from tests.support.corner_image import CHUNK, TREE_SCRIPT
from tests.support.image_fixtures import push_layout


def container_tree(ctrd: EmbeddedContainerd, ref: str, name: str) -> dict[str, str]:
    """Path → "mode|uid|gid|size|links|major|minor|target-or-sha256" as the container sees it."""
    ctrd.ctr("images", "pull", "--plain-http", ref, timeout=300)
    out = ctrd.ctr("run", "--rm", ref, name, "/bin/busybox", "sh", "-c", TREE_SCRIPT, timeout=300).stdout
    lines = out.splitlines()
    assert lines and lines[-1] == "END-OF-TREE", out[-2000:]
    tree = {}
    for line in lines[:-1]:
        path, _, rest = line.partition("|")
        tree[path] = rest
    return tree


def test_plain_containerd_runs_the_converted_image_with_the_same_tree(
    containerd: EmbeddedContainerd, registry, corner_case_layout: Path
) -> None:
    original = push_layout(corner_case_layout, registry.address, "corner/original")
    converted = f"{registry.address}/corner/seekable:1"
    subprocess.run([sys.executable, "-m", "peerpull", "convert", "--quiet", original, converted, "--chunk-size", str(CHUNK)],
                   check=True, capture_output=True, timeout=300)
    before = container_tree(containerd, original, "original")
    after = container_tree(containerd, converted, "converted")
    assert after == before
    # the corner cases really are in the tree containerd assembled
    assert "./victims/keep" in after and "./victims/file" not in after and "./victims/dir" not in after
    assert "./opaque/new" in after and "./opaque/old-a" not in after and "./opaque/old-dir" not in after
    assert after["./file-becomes-dir"].startswith("41c0|")  # a directory, mode 0700
    assert after["./dir-becomes-file"].startswith("81a4|")
    assert after["./devices/null"].split("|")[5:7] == ["1", "3"]
    assert after["./files/setuid"].startswith("89ed|")  # setuid 04755
    assert after["./hardlinks/across"].split("|")[4] == "2"
    run = containerd.ctr("run", "--rm", converted, "entrypoint").stdout
    assert "corner-case image" in run
