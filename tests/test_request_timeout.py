"""A kernel FUSE request timeout shorter than the longest fetch a read may wait for is warned
about once at start-up, naming the setting to change (the proc files are fakes here: the real
ones are the host's to set)."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from converter.registry.config import RegistryConfig
from peer.config import PeerConfig
from snapshotter.fs.request_timeout import check_request_timeout, kernel_request_timeout_s, longest_fetch_s

PEER = PeerConfig()
REGISTRY = RegistryConfig()


def proc(tmp_path: Path, default: int | None, maximum: int | None) -> Path:
    for name, value in (("default_request_timeout", default), ("max_request_timeout", maximum)):
        if value is not None:
            (tmp_path / name).write_text(f"{value}\n")
    return tmp_path


def test_the_longest_fetch_is_two_peers_then_the_origin() -> None:
    assert longest_fetch_s(PEER, REGISTRY) == 2 * PEER.peer_timeout_s + REGISTRY.request_deadline_s
    assert longest_fetch_s(PeerConfig(peer_timeout_s=1), RegistryConfig(request_deadline_s=5)) == 7


@pytest.mark.parametrize("default, maximum, requested, expected", [
    (None, None, 0, None),  # a kernel without request timeouts
    (0, 0, 0, None),  # the default: none
    (0, 30, 0, (30, "fs.fuse.max_request_timeout")),  # the maximum applies alone
    (45, 0, 0, (45, "fs.fuse.default_request_timeout")),
    (45, 30, 0, (30, "fs.fuse.max_request_timeout")),  # the default capped by the maximum
    (20, 30, 0, (20, "fs.fuse.default_request_timeout")),
    (20, 30, 25, (25, "the request timeout asked for at INIT")),  # a server's own replaces the default
    (20, 30, 90, (30, "fs.fuse.max_request_timeout")),  # and is capped too
])
def test_the_timeout_the_kernel_applies(tmp_path: Path, default: int | None, maximum: int | None, requested: int,
                                        expected: tuple[int, str] | None) -> None:
    assert kernel_request_timeout_s(proc(tmp_path, default, maximum), requested) == expected


def test_a_short_timeout_is_warned_about_with_the_setting_to_change(tmp_path: Path) -> None:
    longest = longest_fetch_s(PEER, REGISTRY)
    with structlog.testing.capture_logs() as logs:
        assert check_request_timeout(PEER, REGISTRY, proc(tmp_path, 0, 30)) is True
    [warning] = [e for e in logs if e["event"] == "fuse_request_timeout_short"]
    assert warning["log_level"] == "warning"
    assert warning["timeout_s"] == 30 and warning["longest_fetch_s"] == longest
    assert warning["setting"] == "fs.fuse.max_request_timeout"
    assert f"sysctl -w fs.fuse.max_request_timeout={int(longest) + 1}" in warning["hint"]


def test_a_long_enough_timeout_or_none_is_quiet(tmp_path: Path) -> None:
    longest = int(longest_fetch_s(PEER, REGISTRY))
    with structlog.testing.capture_logs() as logs:
        assert check_request_timeout(PEER, REGISTRY, proc(tmp_path, 0, longest + 1)) is False
        assert check_request_timeout(PEER, REGISTRY, tmp_path / "missing") is False
    assert [e for e in logs if e["log_level"] == "warning"] == []


def test_a_shorter_registry_deadline_silences_it(tmp_path: Path) -> None:
    fast = RegistryConfig(request_deadline_s=5)
    assert check_request_timeout(PeerConfig(peer_timeout_s=2), fast, proc(tmp_path, 0, 10)) is False
    assert check_request_timeout(PEER, fast, proc(tmp_path, 0, 10)) is True


def test_this_kernel_answers_without_error() -> None:
    # whatever the host has set: a number and its setting, or nothing
    found = kernel_request_timeout_s()
    assert found is None or (found[0] > 0 and found[1].startswith("fs.fuse."))


def test_the_daemon_checks_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peerpull.daemon import NodeDaemon
    from snapshotter import config as snapshotter_config
    from snapshotter.fs import request_timeout

    monkeypatch.setattr(request_timeout, "PROC_DIR", proc(tmp_path, 0, 15))  # where the daemon looks
    with structlog.testing.capture_logs() as logs:
        NodeDaemon(snapshotter_config.SnapshotterConfig(root=str(tmp_path / "root")), PEER, REGISTRY)
    assert [e["timeout_s"] for e in logs if e["event"] == "fuse_request_timeout_short"] == [15]
