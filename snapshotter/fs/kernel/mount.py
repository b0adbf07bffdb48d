"""Mounting a FUSE filesystem without libfuse: open /dev/fuse, mount(2) with the descriptor in the
options (through ctypes: Python has no mount call), and unmount with umount2(MNT_DETACH).

The mount is read-only, nosuid, nodev, `allow_other` (containers run as any user) and
`default_permissions` (the kernel checks modes, as on a disk filesystem)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from converter.format.errors import ConfigError

FUSE_DEVICE = "/dev/fuse"
FSTYPE = "fuse.peerpull"
SOURCE = "peerpull"
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def open_device() -> int:
    """A new FUSE connection's descriptor (not yet bound to a mount)."""
    try:
        return os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open {FUSE_DEVICE} ({exc.strerror}): load the fuse module and run as root") from exc


def mount_fd(fd: int, mountpoint: Path) -> None:
    """Mount the connection `fd` at `mountpoint`; the kernel queues INIT on `fd` right away."""
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions".encode()
    if _libc.mount(SOURCE.encode(), str(mountpoint).encode(), FSTYPE.encode(), MS_RDONLY | MS_NOSUID | MS_NODEV,
                   data) != 0:
        code = ctypes.get_errno()
        raise ConfigError(f"mount of FUSE at {mountpoint} failed: {os.strerror(code)}")


def unmount(mountpoint: Path) -> bool:
    """Detach the mount (busy or not); False if nothing was mounted there."""
    if _libc.umount2(str(mountpoint).encode(), MNT_DETACH) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone
        return False
    raise ConfigError(f"unmount of {mountpoint} failed: {os.strerror(code)}")
