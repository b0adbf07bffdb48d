"""FUSE on this host: the device, fusermount3, and what the kernel's FUSE offers.

The kernel's features are read the way the daemon reads them: a throwaway mount of an empty
connection under a temp dir, answered with the daemon's own INIT (snapshotter/fs/kernel), then
detached. Nothing else is ever served on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

from peerpull.doctor.check import CheckResult, DoctorContext, failed, ok
from snapshotter.fs.kernel import abi, handshake, mount
from snapshotter.fs.kernel.abi import InitFlag


async def check_fuse(context: DoctorContext) -> list[CheckResult]:
    backend = context.config.snapshotter.fuse_backend
    results = [_device()]
    results.append(_fusermount(backend))
    if results[0].ok:
        results.append(await asyncio.to_thread(_kernel_features, backend))
    return results


def _device() -> CheckResult:
    if not os.path.exists(mount.FUSE_DEVICE):
        return failed("fuse_device", f"{mount.FUSE_DEVICE} is missing: load the fuse module (modprobe fuse), or "
                                     "give the container the device (--device /dev/fuse, the chart's hostPath)")
    try:
        os.close(os.open(mount.FUSE_DEVICE, os.O_RDWR))
    except OSError as exc:
        return failed("fuse_device", f"{mount.FUSE_DEVICE} cannot be opened ({exc.strerror}): run as root, "
                                     "or allow the device in the container's cgroup")
    return ok("fuse_device", f"{mount.FUSE_DEVICE} opens read-write")


def _fusermount(backend: str) -> CheckResult:
    found = shutil.which("fusermount3")
    if found:
        return ok("fusermount3", f"{found}")
    if backend == "pyfuse3":
        return failed("fusermount3", "fusermount3 not found and snapshotter.fuse_backend = pyfuse3 needs it: "
                                     "apt-get install fuse3")
    return ok("fusermount3", "not found; only the pyfuse3 backend needs it (apt-get install fuse3 to have the fallback)")


def _kernel_features(backend: str) -> CheckResult:
    """Protocol minor, passthrough and resend as this kernel settles them with the daemon's INIT."""
    where = Path(tempfile.mkdtemp(prefix="peerpull-doctor-fuse-"))
    fd = -1
    try:
        fd = mount.open_device()
        mount.mount_fd(fd, where)
        # the probe is no session: its fuse_session_init event would only read like one
        quiet = logging.getLogger(handshake.__name__)
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            state = handshake.negotiate(fd)
        finally:
            quiet.setLevel(level)
            mount.unmount(where)
    except Exception as exc:  # a kernel the kernel backend cannot use: say which backend serves instead
        reason = " ".join(str(exc).split())[:300]
        if backend == "kernel":
            return failed("fuse_kernel", f"the kernel FUSE session cannot start ({reason}): "
                                         "set snapshotter.fuse_backend = auto or pyfuse3")
        return ok("fuse_kernel", f"the kernel FUSE session cannot start ({reason}); the daemon uses pyfuse3 "
                                 "(no passthrough, no live restart)")
    finally:
        if fd >= 0:
            os.close(fd)
        try:
            where.rmdir()
        except OSError:
            pass
    flags = state["flags"]
    passthrough, resend = bool(flags & InitFlag.PASSTHROUGH), bool(flags & InitFlag.HAS_RESEND)
    notes = []
    if not passthrough:
        notes.append("no passthrough: every read goes through the daemon (Linux 6.9+ has it)")
    if not resend:
        notes.append("no resend: a daemon restart fails reads in flight (Linux 6.9+ has it)")
    summary = (f"FUSE {state['major']}.{state['minor']} (peerpull speaks up to {abi.KERNEL_MAJOR}.{abi.KERNEL_MINOR}), "
               f"passthrough {'yes' if passthrough else 'no'}, resend {'yes' if resend else 'no'}")
    return ok("fuse_kernel", summary + ("; " + "; ".join(notes) if notes else ""))
