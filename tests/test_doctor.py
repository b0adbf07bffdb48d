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

from peerpull import containerd_snippets, exit_codes
from peerpull.config import load_config
from peerpull.containerd_snippets import Wiring
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


def _wiring(text: str, daemon: tuple[int, int] | None) -> dict[str, CheckResult]:
    return {r.name: r for r in check_wiring(tomllib.loads(text), "peerpull", "/run/peerpull/snapshotter.sock", daemon)}


def test_containerd_2_needs_the_annotations_export_and_a_transfer_unpack_entry() -> None:
    partial = _wiring(V3, (2, 0))
    assert not partial["containerd_proxy_plugin"].ok
    assert "enable_remote_snapshot_annotations" in partial["containerd_proxy_plugin"].message
    assert not partial["containerd_transfer_unpack"].ok and "unpack_config" in partial["containerd_transfer_unpack"].message
    assert partial["containerd_cri_snapshotter"].ok and partial["containerd_cri_annotations"].ok
    complete = _wiring(V3_COMPLETE, None)  # containerd not reachable: version 3 means 2.x
    assert all(r.ok for r in complete.values()), complete


def test_containerd_1_refuses_a_version_3_config_and_reads_cri_from_the_grpc_plugin() -> None:
    assert not _wiring(V3_COMPLETE, (1, 7))["containerd_config_version"].ok
    v2 = 'version = 2\n[proxy_plugins.peerpull]\n  type = "snapshot"\n  address = "/run/peerpull/snapshotter.sock"\n' \
         + CRI_WIRED
    checks = _wiring(v2, (1, 7))
    assert all(r.ok for r in checks.values()) and "containerd_transfer_unpack" not in checks
    assert not _wiring(v2, (2, 1))["containerd_transfer_unpack"].ok  # the same file under containerd 2.x


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


# --- what the containerd 1.7 and 2.1 runs found (tests/test_containerd_versions.py), on the config text ---

def _printed(containerd: str, runtime_class: str = "", complete: bool = True) -> str:
    w = Wiring(containerd=containerd, runtime_class=runtime_class)
    return containerd_snippets.config_file(w) if complete else containerd_snippets.snippet(w)


TRANSFER_ONLY_21 = """
version = 3
[proxy_plugins.peerpull]
  type = "snapshot"
  address = "/run/peerpull/snapshotter.sock"
  exports = { enable_remote_snapshot_annotations = "true" }
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "peerpull"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "peerpull"
"""


def test_containerd_2_1_transfer_service_cri_pulls_need_no_snapshot_annotations_setting() -> None:
    # containerd 2.1's CRI pulls through the transfer service, which passes the layer labels (seen lazy on 2.1.9)
    accepted = _wiring(TRANSFER_ONLY_21, (2, 1))
    assert all(r.ok for r in accepted.values()), accepted
    assert "transfer service" in accepted["containerd_cri_annotations"].message
    assert all(r.ok for r in _wiring(TRANSFER_ONLY_21, None).values())  # version 3, containerd not answering
    # 2.0's CRI pulls locally: it still needs disable_snapshot_annotations = false
    assert not _wiring(TRANSFER_ONLY_21, (2, 0))["containerd_cri_annotations"].ok
    # 2.1 told to pull locally, or the transfer service not unpacking to peerpull: no labels
    assert not _wiring(TRANSFER_ONLY_21.replace('snapshotter = "peerpull"\n[[',
                                                'snapshotter = "peerpull"\n  use_local_image_pull = true\n[['),
                       (2, 1))["containerd_cri_annotations"].ok
    no_unpack = TRANSFER_ONLY_21[:TRANSFER_ONLY_21.index("[[")]
    assert not _wiring(no_unpack, (2, 1))["containerd_cri_annotations"].ok


@pytest.mark.parametrize(("containerd", "daemon"), [("1.7", (1, 7)), ("2", (2, 1)), ("2", (2, 0))])
def test_the_printed_runtime_class_wiring_is_healthy(containerd: str, daemon: tuple[int, int]) -> None:
    for complete in (True, False):
        text = _printed(containerd, "lazy", complete)
        if not complete:  # appended to a node's file, which has its runc (1.x would not load CRI without)
            text = ("version = 3\n" if containerd == "2" else 'version = 2\n[plugins."io.containerd.grpc.v1.cri"'
                    '.containerd.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n') + text
        checks = _wiring(text, daemon)
        assert all(r.ok for r in checks.values()), checks
        assert "runtime handler lazy" in checks["containerd_cri_snapshotter"].message
    assert all(r.ok for r in _wiring(_printed(containerd), daemon).values())


def test_runtime_class_miswirings_are_named() -> None:
    # 1.6 has no snapshotter per runtime
    v2 = _printed("1.7", "lazy")
    assert not _wiring(v2, (1, 6))["containerd_cri_snapshotter"].ok
    assert "1.6" in _wiring(v2, (1, 6))["containerd_cri_snapshotter"].message
    # 2.x: a handler's snapshotter without its runtime_platforms entry unpacks to overlayfs
    v3 = _printed("2", "lazy")
    without = v3[:v3.index("# containerd 2.x unpacks")]
    platforms = _wiring(without, (2, 1))["containerd_cri_runtime_platforms"]
    assert not platforms.ok and 'runtime_platforms.lazy]' in platforms.message
    # neither a default snapshotter nor a handler
    none = _wiring(v3.replace('snapshotter = "peerpull"', 'snapshotter = "overlayfs"'), (2, 1))
    assert not none["containerd_cri_snapshotter"].ok and "--runtime-class" in none["containerd_cri_snapshotter"].message


def test_containerd_1_runtimes_without_the_default_runtime_are_named() -> None:
    # the snippet alone as a whole file: runtimes.lazy replaces the built-in runc, CRI does not load (1.7.24)
    alone = "version = 2\n" + _printed("1.7", "lazy", complete=False)
    check = _wiring(alone, (1, 7))["containerd_cri_default_runtime"]
    assert not check.ok and "runtimes.runc]" in check.message
    assert _wiring(_printed("1.7", "lazy"), (1, 7))["containerd_cri_default_runtime"].ok
    named = alone.replace("disable_snapshot_annotations = false",
                          'disable_snapshot_annotations = false\n  default_runtime_name = "lazy"')
    assert _wiring(named, (1, 7))["containerd_cri_default_runtime"].ok
    assert "containerd_cri_default_runtime" not in _wiring(_printed("2", "lazy"), (2, 1))  # 2.x keeps runc


def test_real_containerd_1_6_loads_cri_only_with_the_default_runtime_declared(tmp_path: Path) -> None:
    """The same replacement happens on the host's 1.6: a runtimes table without runc, CRI fails to load;
    config_file declares runc and CRI loads (1.6 ignores the handler's snapshotter)."""
    if reason := fuse_missing():
        pytest.skip(reason)
    alone = _printed("1.7", "lazy", complete=False)
    complete = _printed("1.7", "lazy")
    for text, loads in ((alone, False), (complete[complete.index("["):], True)):
        with EmbeddedContainerd(tmp_path / f"ctrd-{loads}", enable_cri=True, extra_config="\n" + text) as ctrd:
            plugins = ctrd.ctr("plugins", "ls").stdout.splitlines()
            (line,) = [p for p in plugins if p.split()[:2] == ["io.containerd.grpc.v1", "cri"]]
            assert (line.split()[-1] == "ok") is loads, line
            checks = _wiring((ctrd.root / "config.toml").read_text(), (1, 7))
            assert checks["containerd_cri_default_runtime"].ok is loads
