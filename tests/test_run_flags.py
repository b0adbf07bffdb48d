"""`peerpull run`'s docker/nerdctl flags, seen from inside the container (real containerd, runc and
the peerpull snapshotter), the summary block, --plot, and the one-line errors of bad flags."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peerpull.testbed.registry import free_port
from tests.support import images
from tests.support.cli import assert_one_line_error
from tests.support.lazy_stack import LazyStack

NAMESPACE = "p8-run-flags"
SH = ["--", "/bin/busybox", "sh", "-c"]


def _peerpull(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def _on_stack(stack: LazyStack, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`peerpull run` on the stack's containerd (fast: no private set-up per run)."""
    return _peerpull("run", "--address", str(stack.containerd.socket), "--namespace", NAMESPACE,
                     "--daemon-metrics", f"http://{stack.daemon.peer_address}/metrics", *args, env=env)


def _ctr(stack: LazyStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", "--address", str(stack.containerd.socket), "--namespace", NAMESPACE, *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def image(lazy_stack: LazyStack) -> str:
    layout = lazy_stack.root / "flags-image"
    images.build_simple_image(layout, {"etc/motd": b"from the image\n", "data/blob.bin": os.urandom(2 << 20)},
                              cmd=["/bin/busybox", "cat", "/etc/motd"])
    source = images.push_layout(layout, lazy_stack.registry.address, "flags/original")
    target = f"{lazy_stack.registry.address}/flags/seekable:1"
    lazy_stack.convert(source, target, images.CHUNK)
    return target


def _interfaces(text: str) -> set[str]:
    """Interface names of a /proc/net/dev listing."""
    return {line.split(":")[0].strip() for line in text.splitlines() if ":" in line}


@pytest.mark.root
@pytest.mark.slow
def test_env_volume_name_and_rm_are_seen_inside(lazy_stack: LazyStack, image: str, tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "note.txt").write_text("read through the volume\n")
    script = ("echo A=$A B=$B; cat /mnt/in/note.txt; (echo x > /mnt/in/new.txt) 2>/dev/null || echo read-only; "
              "echo z > /mnt/rw/out.txt")
    (tmp_path / "rw").mkdir()
    r = _on_stack(lazy_stack, image, "-e", "A=1", "--env", "B", "-v", f"{tmp_path / 'vol'}:/mnt/in:ro",
                  "--volume", f"{tmp_path / 'rw'}:/mnt/rw", "--name", "p8-kept", "--json", "-", *SH, script,
                  env={**os.environ, "B": "from-the-shell"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["output"].splitlines() == ["A=1 B=from-the-shell", "read through the volume", "read-only"], res
    assert not (tmp_path / "vol" / "new.txt").exists() and (tmp_path / "rw" / "out.txt").read_text() == "z\n"
    assert res["container"] == "p8-kept" and res["removed"] is False
    assert _ctr(lazy_stack, "containers", "info", "p8-kept").returncode == 0  # kept without --rm
    again = _on_stack(lazy_stack, image, "--name", "p8-kept")
    assert_one_line_error(again, 9, "a container named p8-kept already exists")
    assert _ctr(lazy_stack, "containers", "rm", "p8-kept").returncode == 0

    r = _on_stack(lazy_stack, image, "--name", "p8-removed", "--rm", "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["output"] == "from the image" and res["removed"] is True
    info = _ctr(lazy_stack, "containers", "info", "p8-removed")
    assert info.returncode != 0 and "not found" in info.stderr


@pytest.mark.root
@pytest.mark.slow
def test_net_host_sees_the_hosts_interfaces_and_network_none_only_loopback(lazy_stack: LazyStack, image: str) -> None:
    host = _interfaces(Path("/proc/net/dev").read_text())
    r = _on_stack(lazy_stack, image, "--net-host", "--json", "-", "--quiet", *SH, "cat /proc/net/dev")
    assert r.returncode == 0, r.stderr[-3000:]
    inside = _interfaces(json.loads(r.stdout)["output"])
    assert "lo" in inside and (inside - {"lo"}) & host, (inside, host)
    r = _on_stack(lazy_stack, image, "--network", "none", "--json", "-", "--quiet", *SH, "cat /proc/net/dev")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _interfaces(json.loads(r.stdout)["output"]) == {"lo"}


@pytest.mark.root
@pytest.mark.slow
def test_publish_checks_the_port_and_reports_when_it_answers(lazy_stack: LazyStack, image: str) -> None:
    port = free_port()
    r = _on_stack(lazy_stack, image, "-p", f"{port}:{port}", "--benchmark-mode", "readiness",
                  "--readiness-endpoint", f"http://127.0.0.1:{port}/motd", "--json", "-", "--quiet",
                  "--", "/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/etc")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["ports_reachable_s"][str(port)] is not None and res["ports_reachable_s"][str(port)] > 0, res
    assert "-p: no CNI here, so the container runs on the host network" in r.stderr
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        r = _on_stack(lazy_stack, image, "-p", f"{taken}:{taken}")
        assert_one_line_error(r, 2, f"port {taken} is already in use")


@pytest.mark.root
@pytest.mark.slow
def test_summary_block_and_plot_of_a_lazy_and_a_normal_run(lazy_stack: LazyStack, image: str, tmp_path: Path) -> None:
    lazy_json, png = tmp_path / "lazy.json", tmp_path / "runs.png"
    r = _on_stack(lazy_stack, image, "--rm", "--json", str(lazy_json), "--plot", str(tmp_path / "lazy.png"),
                  "--quiet", *SH, "cat /data/blob.bin > /dev/null; echo read")
    assert r.returncode == 0, r.stderr[-3000:]
    for line in ("=== peerpull run: lazy ===", "time to pull", "time to start", "time to first log",
                 "time to complete", "bytes from cache", "bytes from peers", "registry wire bytes"):
        assert line in r.stdout, r.stdout
    lazy = json.loads(lazy_json.read_text())
    assert lazy["tier_samples"], lazy
    last = lazy["tier_samples"][-1]
    assert last["origin"] + last["cache"] + last["peer"] >= 2 << 20  # the blob was read during the run
    assert all(a["t"] <= b["t"] for a, b in zip(lazy["tier_samples"], lazy["tier_samples"][1:]))
    r = _on_stack(lazy_stack, "--mode", "normal", image, "--rm", "--compare", str(lazy_json), "--plot", str(png),
                  "--quiet", *SH, "echo normal")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "=== peerpull run: normal ===" in r.stdout and "from cache" in r.stdout  # the side-by-side table
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 400


def test_gpus_without_the_nvidia_toolkit_names_what_is_missing(tmp_path: Path) -> None:
    r = _peerpull("run", "--gpus", "all", "127.0.0.1:1/none:1", env={**os.environ, "PATH": str(tmp_path)})
    assert_one_line_error(r, 2, "--gpus needs the NVIDIA container toolkit: neither nvidia-container-runtime-hook "
                                "nor nvidia-ctk is in PATH")


@pytest.mark.parametrize(("flags", "needle"), [
    (["--gpus", "two"], "--gpus two: give all, a count N, or device=I[,J]"),
    (["--gpus", "device=GPU-abc"], "device= takes GPU indices"),
    (["-v", "/definitely/not/here:/x"], "/definitely/not/here does not exist on the host"),
    (["-v", "/tmp:relative"], "the container path must be absolute"),
    (["-v", "/tmp:/x:rx"], "the mode must be ro or rw"),
    (["-p", "8080:80"], "cannot remap ports; use -p 80:80"),
    (["-p", "80/udp"], "only tcp ports"),
    (["-e", "=v"], "give K=V"),
    (["--name", "bad name"], "--name 'bad name'"),
    (["--network", "none", "-p", "8080"], "--network none contradicts -p"),
    (["--plot", "/definitely/not/here/x.png"], "--plot /definitely/not/here/x.png: cannot write it"),
    (["--compare", "/definitely/not/here.json"], "--compare /definitely/not/here.json: cannot read"),
])
def test_bad_flags_are_one_line_errors_before_any_work(flags: list[str], needle: str) -> None:
    r = _peerpull("run", *flags, "127.0.0.1:1/none:1")
    assert_one_line_error(r, 2, needle)
