"""`peerpull peer` / `peerpull daemon` start-up mistakes end with one line naming the fix, exit 2.

Real processes through the CLI, as a user meets them (tests/support/cli.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpull.testbed.registry import free_port
from tests.support.cli import assert_one_line_error, peerpull_cmd
from tests.support.peer_cluster import NodeProcess

UNASSIGNED = "198.51.100.7"  # TEST-NET-2: an address of no host here


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERPULL_")}
    return {**env, **extra}


def peer(tmp_path: Path, *args: str, token: str | None = "t", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = _env(**({"PEERPULL_PEER_TOKEN": token} if token else {}))
    return peerpull_cmd("peer", "--discovery", "none", "--cache-dir", str(tmp_path / "cache"), *args,
                        env=env, timeout=timeout)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_no_token_on_a_network_address_is_refused(tmp_path: Path) -> None:
    result = peer(tmp_path, "--listen", f"0.0.0.0:{free_port()}", token=None)
    assert_one_line_error(result, 2, "no cluster token")
    assert "--insecure-no-token" in result.stderr


def test_insecure_no_token_is_an_explicit_opt_in_and_health_needs_no_token(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, "open", free_port(), [], host="0.0.0.0", discovery="none",
                       extra_env={"PEERPULL_PEER_TOKEN": None})  # type: ignore[dict-item]
    node._cmd.append("--insecure-no-token")
    node.start()
    try:
        node.address = f"127.0.0.1:{node.port}"
        node.wait_members(1)
        status, _, _ = node.request("/v1/health", token=None)
        assert status == 200
    finally:
        node.stop()


def test_port_in_use(tmp_path: Path, busy_port: int) -> None:
    assert_one_line_error(peer(tmp_path, "--listen", f"127.0.0.1:{busy_port}"), 2, "already in use")


def test_an_address_that_is_not_this_hosts(tmp_path: Path) -> None:
    assert_one_line_error(peer(tmp_path, "--listen", f"{UNASSIGNED}:7470"), 2, "not an address of this host")


def test_an_unresolvable_listen_host(tmp_path: Path) -> None:
    assert_one_line_error(peer(tmp_path, "--listen", "no-such-host.invalid:7470"), 2, "does not resolve")


def test_unwritable_cache_directory(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = peerpull_cmd("peer", "--discovery", "none", "--listen", f"127.0.0.1:{free_port()}",
                          "--cache-dir", str(tmp_path / "a-file" / "cache"), env=_env(PEERPULL_PEER_TOKEN="t"))
    err = assert_one_line_error(result, 2, "cache directory")
    assert "--cache-dir" in err.message


def test_read_only_cache_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only filesystem needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        result = peerpull_cmd("peer", "--discovery", "none", "--listen", f"127.0.0.1:{free_port()}",
                              "--cache-dir", str(ro), env=_env(PEERPULL_PEER_TOKEN="t"))
        assert_one_line_error(result, 2, "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def _daemon(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return peerpull_cmd("daemon", "--discovery", "none", "--cache-dir", str(tmp_path / "cache"),
                        "--socket", str(tmp_path / "s.sock"), *args, env=_env(PEERPULL_PEER_TOKEN="t"))


def test_daemon_unwritable_root_and_busy_peer_port(tmp_path: Path, busy_port: int) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("the daemon needs root and /dev/fuse before it looks at its directories")
    (tmp_path / "a-file").write_text("")
    result = _daemon(tmp_path, "--root", str(tmp_path / "a-file" / "root"), "--listen", f"127.0.0.1:{free_port()}")
    assert_one_line_error(result, 2, "snapshotter root")
    result = _daemon(tmp_path, "--root", str(tmp_path / "root"), "--listen", f"127.0.0.1:{busy_port}")
    assert_one_line_error(result, 2, "already in use")
    result = peerpull_cmd("daemon", "--discovery", "none", "--root", str(tmp_path / "root2"),
                          "--socket", str(tmp_path / "s2.sock"), "--cache-dir", str(tmp_path / "cache2"),
                          "--listen", f"0.0.0.0:{free_port()}", env=_env())
    assert_one_line_error(result, 2, "no cluster token")
