"""The marker `peerpull run` writes into every private set-up it creates, and the checks
`peerpull clean` makes on it before touching anything.

A set-up is recognised by this marker alone: a format tag, the set-up directory's real path, the
directories it created elsewhere (containerd's root and the daemon's socket dir, under /run for
short socket paths) and the processes it started, each with its start time (/proc/PID/stat field
22) so a recycled PID is never mistaken for ours. The marker is written by root, mode 0600, and
replaced atomically each time something is added, before that thing can outlive the run.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from converter.format.errors import ConfigError
from peerpull.testbed.process import mounts_under, start_time

MARKER_NAME = ".peerpull-setup.json"
FORMAT = "peerpull-run-setup/1"
EXTRA_DIR_PARENT = "/run"
EXTRA_DIR_PREFIXES = ("pp-run-", "ppd-")  # what run and its daemon create under /run


class NotASetupError(ConfigError):
    """A directory without a valid marker of ours: `peerpull clean` leaves it alone."""


@dataclass
class RecordedProcess:
    role: str  # containerd | daemon
    pid: int
    start_time: int


@dataclass
class SetupMarker:
    path: str  # real path of the set-up directory
    created: float = field(default_factory=time.time)
    extra_dirs: list[str] = field(default_factory=list)
    processes: list[RecordedProcess] = field(default_factory=list)
    containerd_socket: str = ""

    @property
    def file(self) -> Path:
        return Path(self.path) / MARKER_NAME

    @classmethod
    def create(cls, setup_dir: Path) -> SetupMarker:
        marker = cls(os.path.realpath(setup_dir))
        marker.save()
        return marker

    def save(self) -> None:
        record = {"format": FORMAT, **asdict(self)}
        tmp = self.file.with_name(f"{MARKER_NAME}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(record, out, indent=1)
        os.replace(tmp, self.file)

    def add_dir(self, path: Path) -> None:
        self.extra_dirs.append(os.path.realpath(path))
        self.save()

    def add_process(self, role: str, pid: int) -> None:
        started = start_time(pid)
        if started is not None:  # already gone: nothing to record
            self.processes.append(RecordedProcess(role, pid, started))
            self.save()

    def valid_extra_dirs(self) -> tuple[list[str], list[str]]:
        """The recorded outside directories that are what run creates (directly under /run, our
        name prefix, a real directory owned by us, no symlink on the way), and the others."""
        good, bad = [], []
        for d in self.extra_dirs:
            try:
                st = os.lstat(d)
            except OSError:
                continue  # already gone
            ok = (os.path.realpath(d) == d and os.path.dirname(d) == EXTRA_DIR_PARENT
                  and os.path.basename(d).startswith(EXTRA_DIR_PREFIXES) and stat.S_ISDIR(st.st_mode)
                  and st.st_uid == os.geteuid())
            (good if ok else bad).append(d)
        return good, bad

    def remove(self) -> list[str]:
        """Delete the set-up directory and its valid outside directories, unless a mount is left
        below one of them (deleting would then reach into the mounted file system); returns the
        mounts left (empty: all deleted)."""
        inside, _ = self.valid_extra_dirs()
        left = mounts_under(self.path, *inside)
        if not left:
            for d in [*inside, self.path]:
                shutil.rmtree(d, ignore_errors=True)
        return left


def _owned_and_private(path: str, what: str, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise NotASetupError(f"{what} is owned by uid {st.st_uid}, not by us")
    if st.st_mode & 0o022:
        raise NotASetupError(f"{what} is writable by others")


def load_marker(setup_dir: Path) -> SetupMarker:
    """The set-up's marker after every check; NotASetupError naming what is wrong otherwise."""
    real = os.path.realpath(setup_dir)
    prefix = f"{setup_dir} is not a peerpull run set-up"
    marker_path = os.path.join(real, MARKER_NAME)
    try:
        st_dir, st_marker = os.lstat(real), os.lstat(marker_path)
    except OSError:
        raise NotASetupError(f"{prefix} (no {MARKER_NAME})") from None
    if not stat.S_ISREG(st_marker.st_mode):
        raise NotASetupError(f"{prefix} ({MARKER_NAME} is not a regular file)")
    try:
        _owned_and_private(real, "the directory", st_dir)
        _owned_and_private(marker_path, MARKER_NAME, st_marker)
    except NotASetupError as exc:
        raise NotASetupError(f"{prefix} ({exc})") from None
    try:
        record = json.loads(Path(marker_path).read_text())
        if record.pop("format", None) != FORMAT:
            raise ValueError("unknown format tag")
        marker = SetupMarker(
            path=str(record["path"]), created=float(record["created"]),
            extra_dirs=[str(d) for d in record["extra_dirs"]],
            processes=[RecordedProcess(str(p["role"]), int(p["pid"]), int(p["start_time"]))
                       for p in record["processes"]],
            containerd_socket=str(record.get("containerd_socket", "")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NotASetupError(f"{prefix} (unreadable marker: {exc})") from None
    if marker.path != real:
        raise NotASetupError(f"{prefix} (its marker names {marker.path})")
    return marker


def has_marker(directory: Path) -> bool:
    return os.path.lexists(os.path.join(directory, MARKER_NAME))
