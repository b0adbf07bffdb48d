"""`peerpull doctor` against real parts: a private containerd wired to a running daemon, one wired
wrong, the daemon down; the containerd 2.x rules on parsed configs; --json's shape; --help."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpull import exit_codes
from peerpull.config import load_config
from peerpull.doctor.check import CheckResult, DoctorContext, run_checks
from peerpull.doctor.containerd_wiring import check_wiring
from peerpull.testbed.containerd import EmbeddedContainerd
from peerpull.testbed.daemon import EmbeddedDaemon
from peerpull.testbed.registry import free_port
from tests.support.lazy_stack import fuse_missing
from tests.support.peer_cluster import TOKEN, start_cluster

pytestmark = [pytest.mark.root]

CRI_WIRED = """
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "peerpull"
  disable_snapshot_annotations = false
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedDaemon]:
    if reason := fuse_missing():
        pytest.skip(reason)
    with EmbeddedDaemon(tmp_path_factory.mktemp("p6-doctor") / "daemon") as d:
        yield d


def _env(daemon: EmbeddedDaemon, socket: Path | None = None) -> dict[str, str]:
    """This node's settings as the daemon was started with them (doctor reads the same config)."""
    return {**os.environ, "PEERPULL_SNAPSHOTTER_SOCKET": str(socket or daemon.socket),
            "PEERPULL_SNAPSHOTTER_ROOT": str(daemon.root / "snapshotter"),
            "PEERPULL_PEER_CACHE_DIR": str(daemon.root / "cache"), "PEERPULL_PEER_LISTEN_HOST": "127.0.0.1",
            "PEERPULL_PEER_LISTEN_PORT": str(daemon.port), "PEERPULL_PEER_DISCOVERY": "none"}


def _doctor(config: Path, env: dict[str, str], *extra: str) -> tuple[int, dict]:
    result = subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "doctor", "--json",
                             "--containerd-config", str(config), *extra],
                            capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.returncode, json.loads(result.stdout)


def _by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_a_wired_containerd_and_a_running_daemon_are_healthy(daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    with EmbeddedContainerd(tmp_path / "ctrd", proxy_plugins={"peerpull": str(daemon.socket)}, enable_cri=True,
                            extra_config=CRI_WIRED) as ctrd:
        code, report = _doctor(ctrd.root / "config.toml", _env(daemon))
    failed = [c for c in report["checks"] if not c["ok"]]
    assert code == 0 and report["healthy"] is True and not failed, failed
    checks = _by_name(report)
    # every group ran, and what was found is said
    for name in ("fuse_device", "fuse_kernel", "containerd_socket", "containerd_proxy_plugin",
                 "containerd_cri_snapshotter", "containerd_cri_annotations", "daemon_socket", "daemon_peer_server",
                 "storage_cache", "storage_object_store", "peer_token", "peers_reachable"):
        assert name in checks, name
    assert "containerd 1." in checks["containerd_socket"]["message"]
    assert "FUSE 7." in checks["fuse_kernel"]["message"]
    assert f"node-{daemon.port}" in checks["daemon_peer_server"]["message"]


def test_a_miswired_containerd_fails_with_the_fix(daemon: EmbeddedDaemon, tmp_path: Path) -> None:
    # the proxy plugin points at another socket and CRI keeps its annotations off (the default)
    wrong = tmp_path / "elsewhere.sock"
    with EmbeddedContainerd(tmp_path / "ctrd", proxy_plugins={"peerpull": str(wrong)}, enable_cri=True) as ctrd:
        code, report = _doctor(ctrd.root / "config.toml", _env(daemon))
    checks = _by_name(report)
    assert code == exit_codes.UNHEALTHY and report["healthy"] is False
    assert checks["containerd_socket"]["ok"] and checks["daemon_socket"]["ok"]
    proxy = checks["containerd_proxy_plugin"]
    assert not proxy["ok"] and str(wrong) in proxy["message"] and str(daemon.socket) in proxy["message"]
    assert not checks["containerd_cri_snapshotter"]["ok"] and 'snapshotter = "peerpull"' in \
        checks["containerd_cri_snapshotter"]["message"]
    assert not checks["containerd_cri_annotations"]["ok"]
    assert "disable_snapshot_annotations = false" in checks["containerd_cri_annotations"]["message"]


def test_the_daemon_down_and_no_containerd_config_are_failed_checks_not_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PEERPULL_SNAPSHOTTER_SOCKET": str(tmp_path / "none.sock"),
           "PEERPULL_SNAPSHOTTER_ROOT": str(tmp_path / "root"), "PEERPULL_PEER_CACHE_DIR": str(tmp_path / "cache"),
           "PEERPULL_PEER_LISTEN_HOST": "0.0.0.0", "PEERPULL_PEER_LISTEN_PORT": str(free_port("127.0.0.1")),
           "PEERPULL_PEER_STATIC_PEERS": f"127.0.0.1:{free_port('127.0.0.1')}",
           "PEERPULL_SNAPSHOTTER_CONTAINERD_ADDRESS": str(tmp_path / "no-containerd.sock")}
    env.pop("PEERPULL_PEER_TOKEN", None)
    code, report = _doctor(tmp_path / "missing.toml", env, "--timeout", "1")
    assert code == exit_codes.UNHEALTHY and report["healthy"] is False
    assert set(report) == {"healthy", "checks"}
    for check in report["checks"]:
        assert set(check) == {"name", "ok", "message"} and isinstance(check["ok"], bool) and check["message"]
    checks = _by_name(report)
    for name in ("containerd_config", "containerd_socket", "daemon_socket", "daemon_peer_server", "peer_token",
                 "peers_reachable"):
        assert not checks[name]["ok"], name
    assert "peerpull containerd-config" in checks["containerd_config"]["message"]
    assert "PEERPULL_PEER_TOKEN" in checks["peer_token"]["message"]


def test_the_text_report_is_one_line_per_check_and_a_verdict(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "doctor",
                             "--containerd-config", str(tmp_path / "missing.toml"), "--timeout", "1"],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PEERPULL_SNAPSHOTTER_SOCKET": str(tmp_path / "x.sock"),
                                 "PEERPULL_PEER_DISCOVERY": "none"})
    lines = result.stdout.strip().splitlines()
    assert result.returncode == exit_codes.UNHEALTHY
    assert lines[-1].startswith("unhealthy: ") and all(line[:4] in ("ok  ", "FAIL") for line in lines[:-1])
    assert any(line.startswith("FAIL containerd_config ") for line in lines)


async def test_a_check_that_crashes_or_hangs_is_a_failed_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import peerpull.doctor.check as check_module
    monkeypatch.setattr(check_module, "CHECK_TIMEOUT_S", 0.2)

    async def crashes(context: DoctorContext) -> list[CheckResult]:
        raise KeyError("boom")

    async def hangs(context: DoctorContext) -> list[CheckResult]:
        await asyncio.sleep(60)
        return []

    async def fine(context: DoctorContext) -> list[CheckResult]:
        return [CheckResult("fine", True, "ok")]

    context = DoctorContext(load_config(environ={}), Path("/nonexistent"))
    results = await run_checks(context, [("crashes", crashes), ("hangs", hangs), ("fine", fine)])
    assert [(r.name, r.ok) for r in results] == [("crashes", False), ("hangs", False), ("fine", True)]
    assert "KeyError" in results[0].message and "0.2 s" in results[1].message


V3 = """
version = 3
[proxy_plugins.peerpull]
  type = "snapshot"
  address = "/run/peerpull/snapshotter.sock"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "peerpull"
  disable_snapshot_annotations = false
"""
V3_COMPLETE = V3 + """
[proxy_plugins.peerpull.exports]
  enable_remote_snapshot_annotations = "true"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "peerpull"
"""


def _wiring(text: str, major: int | None) -> dict[str, CheckResult]:
    return {r.name: r for r in check_wiring(tomllib.loads(text), "peerpull", "/run/peerpull/snapshotter.sock", major)}


def test_containerd_2_needs_the_annotations_export_and_a_transfer_unpack_entry() -> None:
    partial = _wiring(V3, 2)
    assert not partial["containerd_proxy_plugin"].ok
    assert "enable_remote_snapshot_annotations" in partial["containerd_proxy_plugin"].message
    assert not partial["containerd_transfer_unpack"].ok and "unpack_config" in partial["containerd_transfer_unpack"].message
    assert partial["containerd_cri_snapshotter"].ok and partial["containerd_cri_annotations"].ok
    complete = _wiring(V3_COMPLETE, None)  # containerd not reachable: version 3 means 2.x
    assert all(r.ok for r in complete.values()), complete


def test_containerd_1_refuses_a_version_3_config_and_reads_cri_from_the_grpc_plugin() -> None:
    assert not _wiring(V3_COMPLETE, 1)["containerd_config_version"].ok
    v2 = 'version = 2\n[proxy_plugins.peerpull]\n  type = "snapshot"\n  address = "/run/peerpull/snapshotter.sock"\n' \
         + CRI_WIRED
    checks = _wiring(v2, 1)
    assert all(r.ok for r in checks.values()) and "containerd_transfer_unpack" not in checks
    assert not _wiring(v2, 2)["containerd_transfer_unpack"].ok  # the same file under containerd 2.x


def test_help_has_examples() -> None:
    for command in ("doctor", "status"):
        out = subprocess.run([sys.executable, "-m", "peerpull", command, "--help"], capture_output=True, text=True,
                             timeout=60).stdout
        assert "examples:" in out and f"peerpull {command} --json" in out, out
    assert f"{exit_codes.UNHEALTHY} a doctor check failed" in subprocess.run(
        [sys.executable, "-m", "peerpull", "--help"], capture_output=True, text=True, timeout=60).stdout


def test_static_peers_answering_and_one_down(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path / "p6-doctor-cluster", 2)
    try:
        env = {**os.environ, "PEERPULL_PEER_TOKEN": TOKEN, "PEERPULL_PEER_LISTEN_HOST": "0.0.0.0",
               "PEERPULL_PEER_STATIC_PEERS": ",".join(n.address for n in nodes)}
        _, report = _doctor(tmp_path / "missing.toml", env, "--timeout", "2")
        checks = _by_name(report)
        assert checks["peers_reachable"]["ok"] and "all 2 static peers" in checks["peers_reachable"]["message"]
        assert checks["peer_token"]["ok"] and "token is set" in checks["peer_token"]["message"]
        nodes[1].stop()
        _, report = _doctor(tmp_path / "missing.toml", env, "--timeout", "2")
        down = _by_name(report)["peers_reachable"]
        assert not down["ok"] and "1 of 2 peers" in down["message"] and nodes[1].address in down["message"]
    finally:
        for node in nodes:
            node.stop()
