"""Starting and stopping the embedded helper processes (registry, containerd, daemon), ending a
recorded process only if it is still the same one, and detaching the mounts a set-up leaves behind."""

from __future__ import annotations

import os
import select
import signal
import subprocess
from collections.abc import Callable
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


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the PID, it names one process for
    the life of the machine, so a recycled PID is told apart. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) may hold spaces and parentheses: count from the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def end_process(pid: int, is_ours: Callable[[int], bool], grace_s: float = 10.0) -> bool:
    """SIGTERM `pid` if `is_ours(pid)` holds (e.g. its start time is the recorded one), SIGKILL after
    `grace_s`; True if it was ours and is now gone.

    The pidfd is taken before the check, so the signals reach the process that was checked even
    if its PID is reused in between (then the check fails, or the send finds it gone)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not is_ours(pid):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has exited
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                signal.pidfd_send_signal(fd, sig)
            except ProcessLookupError:
                return True
            if poller.poll(int(wait_s * 1000)):
                return True
        return False
    finally:
        os.close(fd)


def started_at(started: int) -> Callable[[int], bool]:
    """A check for end_process: the PID still belongs to the process that started at `started`."""
    return lambda pid: start_time(pid) == started


def _unescape(field: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_under(*prefixes: str) -> list[str]:
    """Mount targets at or below one of the directories `prefixes`, deepest first."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    roots = [p.rstrip("/") for p in prefixes if p.rstrip("/")]
    targets = [_unescape(f[1]) for f in (line.split() for line in lines) if len(f) > 1]
    inside = [t for t in targets if any(t == r or t.startswith(r + "/") for r in roots)]
    return sorted(set(inside), key=len, reverse=True)


def unmount_under(*prefixes: str) -> int:
    """Lazily detach every mount at or below one of the directories `prefixes`, deepest first;
    returns how many there were."""
    targets = mounts_under(*prefixes)
    for target in targets:
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=60)
    return len(targets)
