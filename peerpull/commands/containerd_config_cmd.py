"""`peerpull containerd-config`: the containerd configuration that wires in the snapshotter."""

from __future__ import annotations

import argparse
from typing import Any

from peerpull.config import PeerpullConfig

DESCRIPTION = """\
Print what to add to containerd's config.toml (version 2) so that containerd uses the peerpull
daemon: the proxy snapshotter, and for Kubernetes the CRI plugin's snapshotter with snapshot
annotations enabled (without them containerd passes no layer labels and every layer is downloaded).
Restart containerd after adding it.

example:
  peerpull containerd-config >> /etc/containerd/config.toml && systemctl restart containerd
"""


def snippet(config: PeerpullConfig, cri: bool = True) -> str:
    s = config.snapshotter
    lines = [
        f"[proxy_plugins.{s.name}]",
        '  type = "snapshot"',
        f'  address = "{s.socket}"',
    ]
    if cri:
        lines += [
            "",
            '[plugins."io.containerd.grpc.v1.cri".containerd]',
            f'  snapshotter = "{s.name}"',
            "  # pass layer digests and image references to the snapshotter (lazy pulls need them)",
            "  disable_snapshot_annotations = false",
        ]
    return "\n".join(lines) + "\n"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("containerd-config", help="print the containerd config snippet for the snapshotter",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: snapshotter.socket)")
    p.add_argument("--no-cri", action="store_true", help="only the proxy plugin, not the Kubernetes (CRI) settings")
    p.set_defaults(handler=run)
    return p


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    print(snippet(config, cri=not args.no_cri), end="")
    return 0
