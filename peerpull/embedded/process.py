"""Starting and stopping the embedded helper processes (registry, containerd), and detaching the
mounts they leave behind."""

from __future__ import annotations

import subprocess
from pathlib import Path


def spawn_logged(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` with stdout and stderr appended to `log_path`, no stdin."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def unmount_under(*prefixes: str) -> int:
    """Lazily detach every mount whose target lies under one of `prefixes`, deepest first;
    returns how many there were."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return 0
    targets = [f[1] for f in (line.split() for line in lines) if len(f) > 1 and f[1].startswith(prefixes)]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)
    return len(targets)
