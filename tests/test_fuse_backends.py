"""Both FUSE transports pass the same filesystem tests, each the other's reference: the corner-case
tree (whiteouts, opaque directories, hardlinks, odd names and modes) equals overlayfs's, a format
v1 image too, and 200 concurrent readers get correct bytes.

The tests are test_snapshotter.py's own, collected here a second time: this module's `lazy_stack`
(one whole node per backend, the daemon configured with `snapshotter.fuse_backend`) overrides the
shared one, so `corner`, `app` and the tests run against it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from peerpull.testbed.daemon import EmbeddedDaemon
from peerpull.testbed.registry import EmbeddedRegistry
from tests.support.containerd import ContainerdProcess
from tests.support.lazy_stack import LazyStack, fuse_missing
from tests.test_snapshotter import (  # noqa: F401 - fixtures and tests collected again over each backend
    app,
    corner,
    test_200_concurrent_readers_get_correct_bytes,
    test_a_format_v1_image_still_runs_lazily_with_the_same_tree,
    test_converted_image_runs_lazily_with_the_same_tree_as_overlayfs,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module", params=["pyfuse3", "kernel"])
def lazy_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LazyStack]:
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    backend = request.param
    root = tmp_path_factory.mktemp(f"lazy-{backend}")
    env = {"PEERPULL_SNAPSHOTTER_FUSE_BACKEND": backend}
    with EmbeddedRegistry(root / "registry") as registry, EmbeddedDaemon(root / "daemon", extra_env=env) as daemon:
        selected = [e["backend"] for e in daemon.events("fuse_backend_selected")]
        assert selected == [backend], daemon.log_tail()
        with ContainerdProcess(root / "containerd", proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
            yield LazyStack(root, registry, daemon, ctrd)
