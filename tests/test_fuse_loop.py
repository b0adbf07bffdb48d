"""The FUSE loop belongs to the daemon's TaskGroup: when it ends behind the daemon's back (the mount
is detached from outside), the daemon stops loudly, with `fuse_loop_failed` and a non-zero exit,
instead of serving a snapshotter whose lazily served layers are gone. Over both FUSE backends."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from peerpull.testbed.daemon import EmbeddedDaemon
from snapshotter.fs.mount import mounted_at

pytestmark = pytest.mark.root
EXIT_BOUND_S = 120.0  # a guard against a daemon that never stops, not a timing assertion


@pytest.mark.parametrize("backend", ["pyfuse3", "kernel"])
def test_daemon_stops_loudly_when_the_fuse_loop_ends(tmp_path: Path, backend: str) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    with EmbeddedDaemon(tmp_path / "d", extra_env={"PEERPULL_SNAPSHOTTER_FUSE_BACKEND": backend}) as daemon:
        assert [e["backend"] for e in daemon.events("fuse_backend_selected")] == [backend], daemon.log_tail()
        assert mounted_at(daemon.fuse_mount) == "fuse.peerpull"
        subprocess.run(["umount", "-l", str(daemon.fuse_mount)], check=True)
        assert daemon._proc is not None
        code = daemon._proc.wait(timeout=EXIT_BOUND_S)
        assert code not in (0, None), daemon.log_tail()
        failed = daemon.events("fuse_loop_failed")
        assert failed, daemon.log_tail()
        assert [e for e in daemon.events("command_failed") if e["exit_code"] == code], daemon.log_tail()
