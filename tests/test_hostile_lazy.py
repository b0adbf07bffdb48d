"""A lazy Prepare facing a hostile registry: the daemon's ranged reads of a layer end within their
deadline, the layer falls back to an ordinary download (loudly), the image still runs, and the
daemon stays healthy with bounded memory."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpull.testbed.daemon import EmbeddedDaemon
from peerpull.testbed.registry import EmbeddedRegistry
from tests.support import images
from tests.support.cli import peerpull_cmd
from tests.support.containerd import NAMESPACE, ContainerdProcess, run_container
from tests.support.hostile_server import HostileServer
from tests.support.lazy_stack import fuse_missing

pytestmark = [pytest.mark.root, pytest.mark.slow]

MODES = ("silent", "drip", "drip_headers", "garbage", "endless", "huge")
# small deadlines so that each mode costs seconds; the defaults are tested in the registry tests
DAEMON_ENV = {
    "PEERPULL_REGISTRY_CONNECT_TIMEOUT_S": "2",
    "PEERPULL_REGISTRY_READ_TIMEOUT_S": "2",
    "PEERPULL_REGISTRY_REQUEST_DEADLINE_S": "4",
    "PEERPULL_REGISTRY_RETRIES": "1",
    "PEERPULL_REGISTRY_BACKOFF_BASE_S": "0.05",
}


class Node:
    def __init__(self, registry: EmbeddedRegistry, daemon: EmbeddedDaemon, ctrd: ContainerdProcess,
                 hostile: HostileServer, root: Path) -> None:
        self.registry, self.daemon, self.ctrd, self.hostile, self.root = registry, daemon, ctrd, hostile, root


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if reason := fuse_missing():
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("hostile-lazy")
    with EmbeddedRegistry(root / "registry") as registry, HostileServer(registry.url) as hostile:
        with EmbeddedDaemon(root / "daemon", extra_env=DAEMON_ENV) as daemon:
            ctrd_dir = Path(tempfile.mkdtemp(prefix="pphost-", dir="/run"))
            with ContainerdProcess(ctrd_dir, proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
                yield Node(registry, daemon, ctrd, hostile, root)


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("mode", MODES)
def test_a_hostile_range_read_falls_back_and_the_image_runs(node: Node, mode: str) -> None:
    payload = f"{mode} payload\n".encode() * 20_000
    layout = node.root / f"layout-{mode}"
    image = images.build_simple_image(layout, {f"data/{mode}.txt": payload})
    converted = f"{node.registry.address}/hostile/{mode}:seekable"
    assert peerpull_cmd("convert", "--quiet", "--chunk-size", "65536", f"oci:{layout}:latest", converted,
                        timeout=300).returncode == 0
    manifest = json.loads(peerpull_cmd("inspect", "--json", converted).stdout)
    unique = manifest["layers"][-1]["digest"]  # the layer only this image has
    node.hostile.add(f"/blobs/{unique}", mode, interval=1.0, header="range")
    through_hostile = converted.replace(node.registry.address, node.hostile.address)

    result = peerpull_cmd("pull", through_hostile, "--address", str(node.ctrd.socket), "--namespace", NAMESPACE,
                          "--json", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + node.daemon.log_tail()
    report = json.loads(result.stdout)
    assert report["downloaded"] >= 1, report  # the hostile layer fell back to a full, verified download
    out = run_container(node.ctrd, through_hostile, ["/bin/busybox", "wc", "-c", f"/data/{mode}.txt"],
                        snapshotter="peerpull")
    assert out.split()[0] == str(len(payload))

    fallbacks = [f for f in node.daemon.events("lazy_layer_fallback") if f.get("layer") == unique]
    assert fallbacks and fallbacks[-1]["error"], node.daemon.log_tail()
    assert image.layers  # the layout was built as asked
    daemon_pid = node.daemon.pid
    assert daemon_pid is not None and _vm_hwm_mb(daemon_pid) < 400  # still running, memory bounded
