"""Start-up checks of the host the node daemon runs on: each failure is one ConfigError naming the fix."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from converter.format.errors import ConfigError

MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; leave room for the kernel's terminator and a margin


def check_host() -> None:
    """Fail early, with the fix, when this host cannot run the daemon."""
    if os.geteuid() != 0:
        raise ConfigError("peerpull daemon needs root (it mounts FUSE and overlay filesystems)")
    if not os.path.exists("/dev/fuse"):
        raise ConfigError("/dev/fuse is missing: load the fuse module (modprobe fuse), or give the container "
                          "the device (--device /dev/fuse, or the chart's hostPath volume)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        raise ConfigError(f"/dev/fuse cannot be opened: {exc.strerror}") from None


def check_socket_path(path: Path) -> None:
    if len(str(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"snapshotter.socket path is too long for a unix socket: {path}")


def writable_dir(path: Path, what: str, fix: str) -> None:
    """Create `path` if needed and prove it takes files; else one ConfigError naming the fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".peerpull-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path} is not usable ({exc.strerror or exc}): {fix}") from None
