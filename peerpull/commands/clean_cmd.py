"""`peerpull clean`: remove what `peerpull run` left behind, and nothing else.

Only directories carrying the marker `peerpull run` wrote (see peerpull.testbed.setup_marker)
are set-ups. Processes end only by their recorded PID and start time (pidfd). Containers are
stopped through the set-up's own containerd while it lives; otherwise its shims are recognised by
their working directory (a task bundle in the set-up's containerd state) and their containers'
init by having such a shim as parent.
Mounts are detached only below the set-up's own directories, and nothing is deleted while a mount
is left below it.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Any

from converter.format.errors import ConfigError, FailedPreconditionError
from peerpull.config import PeerpullConfig
from peerpull.testbed.process import end_process, started_at, unmount_under
from peerpull.testbed.runner import DEFAULT_WORK_ROOT, RUN_LABEL
from peerpull.testbed.setup_marker import MARKER_NAME, NotASetupError, SetupMarker, has_marker, load_marker

DESCRIPTION = f"""\
Remove what `peerpull run` left behind: private set-ups (kept with --keep, or left by an
interrupted run) with their processes and mounts. A set-up is a directory holding the marker
{MARKER_NAME} that `peerpull run` wrote; --work-root is such a directory or holds them (default
{DEFAULT_WORK_ROOT}). Anything else is left alone: directories without a valid marker are skipped
with one line, processes are ended only by the PIDs the marker recorded after checking they are
still the same processes, and only the directories run created are removed. With no set-up found
it says so and exits 0. System directories (/, /tmp, /var/tmp, /run, $HOME or any user's home,
any path of fewer than two components) are refused (exit 2).

With --address it also removes the containers `peerpull run` created in that containerd (label
{RUN_LABEL}). Images and snapshots in a given containerd are left alone (remove them with ctr).

exit codes: 0 removed (or nothing found), 2 refused (a system directory, a marker that is not
ours, not root), 10 a mount below a set-up could not be detached (nothing of it deleted).

examples:
  peerpull clean
  peerpull clean --work-root /var/tmp/peerpull-run/1234-abcdef
  peerpull clean --address /run/containerd/containerd.sock --namespace peerpull-run
"""

_REFUSED = ("/var/tmp", "/var/lib", "/var/run", "/usr/local", "/usr/lib", "/home")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("clean", help="remove what `peerpull run` left behind", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-root", metavar="DIR", default=str(DEFAULT_WORK_ROOT),
                   help=f"a set-up, or a directory holding set-ups (default {DEFAULT_WORK_ROOT})")
    p.add_argument("--address", metavar="SOCKET", default="", help="also remove run containers from this containerd")
    p.add_argument("--namespace", dest="run_namespace", default="peerpull-run", metavar="NS")
    p.set_defaults(handler=run)
    return p


def refuse_system_dir(root: Path) -> str:
    """The real path of `root`, or ConfigError if it is a directory clean must never work on."""
    real = os.path.realpath(root)
    home = os.path.realpath(os.path.expanduser("~"))
    homes = {os.path.realpath(user.pw_dir) for user in pwd.getpwall() if user.pw_dir}
    if len(Path(real).parts) < 3 or real in _REFUSED or real in (home, os.path.dirname(home)) or real in homes:
        raise ConfigError(f"--work-root {root} is a system directory; refusing to clean it "
                          f"(give a set-up directory, e.g. {DEFAULT_WORK_ROOT}/<run>)")
    return real


def find_setups(real: str) -> tuple[list[SetupMarker], list[str]]:
    """The set-ups at `real` (itself, or its direct children) and one line per directory refused."""
    if has_marker(Path(real)):
        return [load_marker(Path(real))], []  # the one asked for: a bad marker is an error
    found, refused = [], []
    try:
        children = sorted((e for e in os.scandir(real) if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
    except OSError:
        return [], []
    for child in (Path(e.path) for e in children):
        if not has_marker(child):
            continue
        try:
            found.append(load_marker(child))
        except NotASetupError as exc:
            refused.append(str(exc))
    return found, refused


def _ctr(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", "--address", socket, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def _stop_tasks(marker: SetupMarker, inside: list[str]) -> None:
    """Kill the set-up's containers through its own containerd, while it is alive and ours."""
    sock = marker.containerd_socket
    ours = [p for p in marker.processes if p.role == "containerd" and started_at(p.start_time)(p.pid)]
    if not sock or not ours or not any(sock.startswith(d + "/") for d in inside) or shutil.which("ctr") is None:
        return
    try:
        namespaces = _ctr(sock, "namespaces", "ls", "-q").stdout.split()
        for ns in namespaces:
            for task in _ctr(sock, "--namespace", ns, "tasks", "ls", "-q").stdout.split():
                _ctr(sock, "--namespace", ns, "tasks", "kill", "-s", "SIGKILL", task)
                _ctr(sock, "--namespace", ns, "tasks", "delete", "-f", task)
    except subprocess.TimeoutExpired:
        pass  # the shims are ended below


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rfind(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _end_containers(inside: list[str]) -> int:
    """The shims of the set-up's containerd and their containers, when containerd is gone.

    containerd starts each shim in its task's bundle directory, under the set-up's state dir: that
    working directory names a shim (never its argv). A container's init is ended only if its
    parent is such a shim; the container's other processes go with its PID namespace."""
    bundles = {os.path.dirname(p) for d in inside
               for p in glob.glob(os.path.join(glob.escape(d), "state", "io.containerd.runtime.v2.task", "*", "*",
                                               "config.json"))}
    bundles = {b for b in bundles if not os.path.islink(b) and os.path.realpath(b) == b}
    if not bundles:
        return 0
    shims = [(int(e.name), cwd) for e in os.scandir("/proc") if e.name.isdigit()
             for cwd in [_cwd(int(e.name))] if cwd in bundles]
    ended = 0
    for shim, bundle in shims:
        try:
            init = int(Path(bundle, "init.pid").read_text().strip())
        except (OSError, ValueError):
            init = 0
        if init:
            ended += end_process(init, lambda pid, shim=shim, bundle=bundle: _parent(pid) == shim and _cwd(shim) == bundle, 2.0)
        ended += end_process(shim, lambda pid, bundle=bundle: _cwd(pid) == bundle, 2.0)
    return ended


def clean_setup(marker: SetupMarker, say: Any) -> tuple[int, int]:
    """End the set-up's processes, detach its mounts, delete it; (processes ended, mounts detached)."""
    inside, outside = marker.valid_extra_dirs()
    for d in outside:
        say(f"{marker.path}: not removing {d} (not a directory peerpull run creates)")
    _stop_tasks(marker, inside)
    ended = _end_containers(inside)
    for proc in reversed(marker.processes):  # containerd before the daemon it uses
        ended += end_process(proc.pid, started_at(proc.start_time))
    dirs = [marker.path, *inside]
    unmounted = unmount_under(*dirs)
    left = marker.remove()
    if left:
        raise FailedPreconditionError(f"{marker.path}: {len(left)} mount(s) could not be detached (e.g. {left[0]}); "
                                      "nothing deleted: unmount them and run peerpull clean again")
    return ended, unmounted


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    real = refuse_system_dir(Path(args.work_root))
    if os.geteuid() != 0:
        raise ConfigError("peerpull clean needs root (it unmounts and stops containerd instances)")
    setups, refused = find_setups(real)
    for line in refused:
        print(f"skipped: {line}")
    if not setups:
        print(f"{args.work_root}: no peerpull run set-up found; nothing removed")
    else:
        ended = unmounted = 0
        for marker in setups:
            e, u = clean_setup(marker, print)
            ended, unmounted = ended + e, unmounted + u
        if real != setups[0].path and os.path.isdir(real) and not os.listdir(real):
            os.rmdir(real)  # the work root only held our set-ups
        print(f"{args.work_root}: {len(setups)} set-up(s) removed, {ended} process(es) stopped, "
              f"{unmounted} mount(s) detached")
    if args.address:
        base = ["ctr", "--address", args.address, "--namespace", args.run_namespace]
        listed = subprocess.run([*base, "containers", "ls", "-q", f"labels.\"{RUN_LABEL}\"==1"],
                                capture_output=True, text=True)
        if listed.returncode != 0:
            raise ConfigError(f"cannot list containers at {args.address}: {listed.stderr.strip()}")
        ids = listed.stdout.split()
        for cid in ids:
            subprocess.run([*base, "tasks", "kill", "-s", "SIGKILL", cid], capture_output=True)
            subprocess.run([*base, "tasks", "delete", "-f", cid], capture_output=True)
            subprocess.run([*base, "containers", "delete", cid], capture_output=True)
        print(f"{args.address}: {len(ids)} run container(s) removed")
    return 0
