"""`peerpull fd-holder`: the small process that keeps the daemon's FUSE connection across a crash."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from peerpull.config import PeerpullConfig

DESCRIPTION = """\
Keep a copy of the node daemon's FUSE connection (its /dev/fuse fd and the state negotiated at
INIT) so running containers keep their mounts while the daemon crashes and restarts: the new
daemon takes the connection back and serves the requests that waited (docs/snapshotter.md, "Live
restart"). The holder never reads the connection, holds nothing else, and exits when the
connection ends (the mount is gone), on SIGTERM, or when told. Its socket (mode 0600) answers
only this user and root.

It must not die with the daemon: run it outside the daemon's process group and cgroup, e.g.
as a unit of its own (systemd-run), or detached (--detach: its own session, reparented to init).
The daemon starts a detached one itself when none answers on the socket.

examples:
  systemd-run --unit=peerpull-fd-holder peerpull fd-holder
  peerpull fd-holder --detach --socket /run/peerpull/fd-holder.sock
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("fd-holder", help="keep the FUSE connection across a daemon crash",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", dest="holder_socket", metavar="PATH", default=None,
                   help="the holder's unix socket (default: snapshotter.fd_holder_socket)")
    p.add_argument("--detach", action="store_true", help="return once it listens; the holder runs on in a new session")
    p.set_defaults(handler=run)
    return p


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    sock = args.holder_socket or config.snapshotter.fd_holder_socket
    # exec the holder's own small module: same pid (a unit's main process stays), and nothing of the
    # CLI (its imports, the event loop's fds) is kept alive next to the connection
    argv = [sys.executable, "-m", "snapshotter.fs.fd_holder", "--socket", sock] + (["--detach"] if args.detach else [])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
