"""Where the daemon keeps data: on a filesystem that can hold it, with room to spare.

The object store's files back FUSE passthrough, which the kernel refuses on overlayfs or FUSE;
the snapshotter root holds overlay upper dirs, which overlayfs cannot take as upper either.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from peerpull.doctor.check import CheckResult, DoctorContext, failed, ok

MIN_FREE = 1 << 30  # below this a pull of a big image fails half-way
STACKED = {"overlay", "fuse", "aufs"}  # neither backs passthrough files nor overlay upper dirs


def filesystem_of(path: Path) -> tuple[str, str]:
    """(mount point, fs type) of the mount holding `path` (or its nearest existing parent)."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    resolved = str(existing.resolve())
    best = ("/", "unknown")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        point = fields[4].encode().decode("unicode_escape")  # \040 for a space
        fstype = right.split()[0] if right else "unknown"
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def _free(path: Path) -> int:
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _check_dir(name: str, path: Path, setting: str, limit: int | None, refuse_stacked: bool) -> CheckResult:
    point, fstype = filesystem_of(path)
    base = fstype.split(".", 1)[0]
    if refuse_stacked and base in STACKED:
        return failed(name, f"{path} is on {fstype} ({point}): give it a plain filesystem (ext4, xfs, btrfs; "
                            f"in a container a hostPath or emptyDir volume), {setting}")
    free = _free(path)
    if free < MIN_FREE:
        return failed(name, f"{path} ({fstype}) has {_gib(free)} free: free space or move it ({setting})")
    note = (f"; its limit {_gib(limit)} is above the free space: lower it or expect early eviction"
            if limit is not None and limit > free else "")
    return ok(name, f"{path} on {fstype}, {_gib(free)} free{note}")


async def check_storage(context: DoctorContext) -> list[CheckResult]:
    s, p = context.config.snapshotter, context.config.peer
    objects = Path(s.object_store_dir) if s.object_store_dir else Path(s.root) / "objects"
    return [
        _check_dir("storage_cache", Path(p.cache_dir), "--cache-dir, peer.cache_dir", p.cache_max_bytes, False),
        _check_dir("storage_snapshotter_root", Path(s.root), "--root, snapshotter.root", None, True),
        _check_dir("storage_object_store", objects, "snapshotter.object_store_dir", s.object_store_bytes, True),
    ]
