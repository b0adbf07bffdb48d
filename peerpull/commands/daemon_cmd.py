"""`peerpull daemon`: the node daemon (snapshotter for containerd, FUSE mount, peer server)."""

from __future__ import annotations

import argparse
from typing import Any

from peerpull.commands.peer_cmd import add_peer_options, run_until_stopped, with_peer_flags
from peerpull.config import PeerpullConfig
from peerpull.daemon import NodeDaemon
from snapshotter.config import PREFETCH_MODES, STREAM_MODES

DESCRIPTION = """\
Run everything a node needs, in one process: the containerd remote snapshotter (gRPC on a unix
socket), the FUSE mount that serves lazily pulled layers, and this node's chunk cache and peer
server with discovery. Configure it with one file (--config, [snapshotter] [peer] [registry]
sections) and flags; wire containerd to it with the snippet `peerpull containerd-config` prints.

The peer server follows the rules of `peerpull peer` (a cluster token, or --insecure-no-token on
a non-loopback address; see `peerpull peer --help` for its limits). The registries this daemon
resolves layers from for its containerd are the ones other nodes may ask it to fetch from.
Start-up problems (no root, no /dev/fuse, an unwritable root, socket or cache directory, the
peer port in use) end with one line and exit 2.

Snapshots and layer tables of contents persist under the root: after a restart, already pulled
images run again without the network. Running containers keep reading across a restart (their
reads stall, never fail; docs/snapshotter.md, "Live restart"; with the kernel FUSE transport,
not with fuse_backend pyfuse3):
  * planned: start the successor with --takeover (it waits for the connection on
    snapshotter.handover_socket), then send SIGHUP to the running daemon: it finishes the FUSE
    requests in flight, releases its socket and port, hands the connection over and exits;
  * crash: a small fd holder process (started by the daemon; snapshotter.fd_holder) keeps the
    connection; the next `peerpull daemon` takes it and the kernel resends the lost requests;
  * SIGTERM or Ctrl-C: leaves the mount to the holder for the next start (keep_mount_on_stop), or
    with keep_mount_on_stop false unmounts and ends the holder.

examples:
  peerpull daemon
  peerpull daemon --root /var/lib/peerpull/snapshotter --socket /run/peerpull/snapshotter.sock
  peerpull daemon --discovery static --peer 10.0.0.2:7470 --prefetch layer
  peerpull daemon --takeover & kill -HUP $OLD_DAEMON_PID   # hand over to a new daemon
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("daemon", help="run the node daemon: containerd snapshotter, FUSE mount, peer server",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", metavar="DIR", help="snapshots, metadata and the FUSE mount (default /var/lib/peerpull/snapshotter)")
    p.add_argument("--socket", metavar="PATH", help="gRPC socket for containerd (default /run/peerpull/snapshotter.sock)")
    p.add_argument("--prefetch", choices=PREFETCH_MODES,
                   help="fetch ahead: nothing, the rest of a file once it is read sequentially (default), "
                        "the rest of a file on its first read, or whole layers")
    p.add_argument("--stream", choices=STREAM_MODES,
                   help="stream the rest of an image in the background: once it is read beyond a threshold "
                        "(auto, default), always, or never")
    p.add_argument("--takeover", action="store_true",
                   help="take the FUSE connection of the running daemon: wait on snapshotter.handover_socket "
                        "(up to handover_timeout_s) until it gets SIGHUP and hands over; exit 10 if none comes")
    add_peer_options(p)
    p.set_defaults(handler=run)
    return p


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    config = with_peer_flags(args, config)
    return await run_until_stopped(NodeDaemon(config.snapshotter, config.peer, config.registry,
                                               takeover=args.takeover, cri=config.cri).run())
