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

On SIGTERM or Ctrl-C it stops serving, unmounts the FUSE mount and exits. Snapshots and layer
tables of contents persist under the root: after a restart, already pulled images run again
without the network. Containers that were running keep their rootfs mounts, but reads of lazily
served files fail until they are restarted (the FUSE connection ends with the process).

examples:
  peerpull daemon
  peerpull daemon --root /var/lib/peerpull/snapshotter --socket /run/peerpull/snapshotter.sock
  peerpull daemon --discovery static --peer 10.0.0.2:7470 --prefetch layer
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
    add_peer_options(p)
    p.set_defaults(handler=run)
    return p


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    config = with_peer_flags(args, config)
    return await run_until_stopped(NodeDaemon(config.snapshotter, config.peer, config.registry).run())
