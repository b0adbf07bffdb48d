"""A private `peerpull daemon` process under a directory (its own root, cache, socket and peer
port), for `peerpull run`, the quickstart, benchmarks and tests.

`global_args` are peerpull's global options for the child (e.g. `--config FILE`, `--log-level`),
`extra_env` its `PEERPULL_*` settings: what the caller was configured with reaches the daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from converter.format.errors import PeerpullError
from peer.metrics import parse_exposition
from peerpull.testbed.process import spawn_logged, stop_process
from peerpull.testbed.registry import free_port


class EmbeddedDaemon:
    def __init__(self, root: Path, host: str = "127.0.0.1", port: int | None = None, discovery: str = "none",
                 peers: list[str] | None = None, extra_env: dict[str, str] | None = None,
                 netns: str | None = None, global_args: list[str] | None = None,
                 on_spawn: Callable[[int], None] | None = None, node_id: str | None = None) -> None:
        self.root = Path(root).absolute()
        self.host = host
        self.port = port or free_port(host)
        # unix socket paths are short (108 bytes): the socket goes to a private dir under /run
        self._sock_dir = Path(tempfile.mkdtemp(prefix="ppd-", dir="/run" if os.access("/run", os.W_OK) else None))
        self.socket = self._sock_dir / "snapshotter.sock"
        self.log_path = self.root / "daemon.log"
        self.fuse_mount = self.root / "snapshotter" / "fuse"
        self.sock_dir = self._sock_dir
        self._on_spawn = on_spawn
        cmd = [sys.executable, "-m", "peerpull", *(global_args or []), "--log-format", "json", "daemon",
               "--root", str(self.root / "snapshotter"), "--socket", str(self.socket),
               "--listen", f"{host}:{self.port}", "--advertise", host, "--node-id", node_id or f"node-{self.port}",
               "--cache-dir", str(self.root / "cache"), "--discovery", discovery]
        for peer in peers or []:
            cmd += ["--peer", peer]
        # nsenter, not `ip netns exec`: that one also gives the child a mount namespace of its own,
        # and a FUSE mount made there would be invisible to containerd
        self._cmd = ["nsenter", f"--net=/run/netns/{netns}", "--", *cmd] if netns else cmd
        # a private set-up cleans up after itself: no fd holder outliving it, a stop unmounts; its
        # handover and holder sockets are its own (a caller's extra_env may still turn them on)
        private = {"PEERPULL_SNAPSHOTTER_FD_HOLDER": "false", "PEERPULL_SNAPSHOTTER_KEEP_MOUNT_ON_STOP": "false",
                   "PEERPULL_SNAPSHOTTER_HANDOVER_SOCKET": str(self._sock_dir / "handover.sock"),
                   "PEERPULL_SNAPSHOTTER_FD_HOLDER_SOCKET": str(self._sock_dir / "fd-holder.sock")}
        self._env = {**os.environ, **private, **(extra_env or {})}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def peer_address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The daemon process while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout_s: float = 30.0) -> EmbeddedDaemon:
        self.root.mkdir(parents=True, exist_ok=True)
        self._proc = spawn_logged(self._cmd, self.log_path, env=self._env)
        if self._on_spawn is not None:
            self._on_spawn(self._proc.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PeerpullError(f"peerpull daemon exited at start: {self.log_tail()}")
            if self.socket.exists() and self._healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise PeerpullError(f"peerpull daemon did not come up within {timeout_s:.0f} s: {self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            urllib.request.urlopen(f"http://{self.peer_address}/v1/health", timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """The daemon's Prometheus metrics, `name{labels}` → value."""
        with urllib.request.urlopen(f"http://{self.peer_address}/metrics", timeout=10) as resp:
            return parse_exposition(resp.read().decode())

    def events(self, name: str) -> list[dict[str, Any]]:
        """The daemon's JSON log records with event `name` (e.g. lazy_layer_fallback), oldest first."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            if f'"{name}"' in line:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == name:
                    out.append(record)
        return out

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def hand_over(self, timeout_s: float = 120.0) -> None:
        """A planned live restart: a successor started with `--takeover`, then SIGHUP to this one;
        returns once the old process exited and the successor is ready (its `daemon_ready`)."""
        old = self._proc
        if old is None or old.poll() is not None:
            raise PeerpullError("no running daemon to hand over from")
        ready_before = len(self.events("daemon_ready"))
        self._proc = spawn_logged([*self._cmd, "--takeover"], self.log_path, env=self._env)
        old.send_signal(signal.SIGHUP)  # it waits for the successor's handover socket
        deadline = time.monotonic() + timeout_s
        try:
            old.wait(timeout_s)
            while len(self.events("daemon_ready")) <= ready_before:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise PeerpullError(f"the successor did not take over: {self.log_tail()}")
                time.sleep(0.05)
        except subprocess.TimeoutExpired:
            raise PeerpullError(f"the daemon did not hand over within {timeout_s:.0f} s: {self.log_tail()}") from None

    def stop(self, kill: bool = False) -> int | None:
        """SIGTERM (or SIGKILL with `kill`); returns the exit status."""
        if self._proc is not None and kill and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        stop_process(self._proc, 20)
        code = self._proc.returncode if self._proc is not None else None
        self._proc = None
        return code

    def close(self) -> None:
        self.stop()
        # from the mount table, not stat(): a mount kept for a successor (keep_mount_on_stop) has
        # nobody serving it now, and a stat would wait for an answer forever
        if str(self.fuse_mount) in _mount_points():
            subprocess.run(["umount", "-l", str(self.fuse_mount)], capture_output=True)
        try:
            for entry in self._sock_dir.iterdir():
                entry.unlink()
            self._sock_dir.rmdir()
        except OSError:
            pass

    def __enter__(self) -> EmbeddedDaemon:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _mount_points() -> set[str]:
    try:
        return {line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if len(line.split()) > 1}
    except OSError:
        return set()
