"""`peerpull clean`: remove what `peerpull run` left behind."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from converter.errors import ConfigError
from peerpull.config import PeerpullConfig
from peerpull.embedded.process import unmount_under
from peerpull.runner import DEFAULT_WORK_ROOT, RUN_LABEL

DESCRIPTION = f"""\
Remove what `peerpull run` left behind: private set-ups under {DEFAULT_WORK_ROOT} (kept with --keep,
or left by an interrupted run) with their processes and mounts, and, with --address, the
containers `peerpull run` created in that containerd (label {RUN_LABEL}). Images and snapshots in
a given containerd are left alone (remove them with ctr if you want).

examples:
  peerpull clean
  peerpull clean --address /run/containerd/containerd.sock --namespace peerpull-run
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("clean", help="remove what `peerpull run` left behind", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-root", metavar="DIR", default=str(DEFAULT_WORK_ROOT), help="where private set-ups live")
    p.add_argument("--address", metavar="SOCKET", default="", help="also remove run containers from this containerd")
    p.add_argument("--namespace", dest="run_namespace", default="peerpull-run", metavar="NS")
    p.set_defaults(handler=run)
    return p


def _processes_under(root: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if root in argv:
            pids.append(int(entry.name))
    return pids


def clean_work_root(root: Path) -> tuple[int, int, int]:
    """Kill processes started for set-ups under `root`, unmount its mounts, delete it."""
    if not root.exists():
        return 0, 0, 0
    # a set-up's containerd lives under /run (short socket paths); its set-up dir names it
    roots = [str(root.resolve())] + [marker.read_text().strip() for marker in root.glob("*/containerd.path")]
    pids = [pid for r in roots for pid in _processes_under(r)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    unmounted = unmount_under(*roots)
    entries = sum(1 for _ in root.iterdir())
    for r in roots[1:]:
        shutil.rmtree(r, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    return len(set(pids)), unmounted, entries


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    if os.geteuid() != 0:
        raise ConfigError("peerpull clean needs root (it unmounts and stops containerd instances)")
    killed, unmounted, setups = clean_work_root(Path(args.work_root))
    print(f"{args.work_root}: {setups} set-up(s) removed, {killed} process(es) stopped, {unmounted} mount(s) detached")
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
