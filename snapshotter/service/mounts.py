"""The mounts containerd gets for a snapshot, the way its own overlayfs snapshotter builds them:
a bind mount when there is one directory, overlayfs otherwise (lowerdirs nearest parent first).
A lazily served parent's directory is its layer's directory in the FUSE mount."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.service.store import ACTIVE, VIEW, Snapshot

_OVERLAY_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


@dataclass(frozen=True)
class MountSpec:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """Where snapshot directories and the FUSE mount live."""

    root: Path

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def fuse(self) -> Path:
        return self.root / "fuse"

    def upper(self, snap: Snapshot) -> Path:
        return self.snapshots / str(snap.id) / "fs"

    def work(self, snap: Snapshot) -> Path:
        return self.snapshots / str(snap.id) / "work"

    def lower(self, snap: Snapshot) -> Path:
        if snap.layer:
            return self.fuse / snap.layer.split(":", 1)[1]
        return self.upper(snap)


def _overlay_options() -> list[str]:
    # as containerd does: with the index feature on, overlayfs would demand file handles of the lowers
    return ["index=off"] if _OVERLAY_INDEX_PARAM.exists() else []


def mounts_for(layout: Layout, snap: Snapshot, parents: list[Snapshot]) -> list[MountSpec]:
    """`parents`: committed ancestors, nearest first."""
    if not parents:
        if snap.layer:
            return [MountSpec("bind", str(layout.lower(snap)), ["ro", "rbind"])]
        return [MountSpec("bind", str(layout.upper(snap)), ["rbind", "ro" if snap.kind == VIEW else "rw"])]
    lowers = ":".join(str(layout.lower(p)) for p in parents)
    if snap.kind == ACTIVE:
        return [MountSpec("overlay", "overlay", [*_overlay_options(), f"workdir={layout.work(snap)}",
                                                  f"upperdir={layout.upper(snap)}", f"lowerdir={lowers}"])]
    if len(parents) == 1:
        return [MountSpec("bind", lowers, ["ro", "rbind"])]
    return [MountSpec("overlay", "overlay", [*_overlay_options(), f"lowerdir={lowers}"])]
