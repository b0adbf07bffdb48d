"""`peerpull peer`: run the node's chunk fetcher and peer server alone."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from peer.node import PeerNode
from peerpull.config import PeerpullConfig

DESCRIPTION = """\
Run this node's chunk cache and peer server: it serves chunks it holds (by digest, verified) to
the other nodes, finds them by zeroconf (or a static list, or DNS), and fetches each chunk a
warm-up asks for from the cheapest tier — local disk, the chunk's owner node, the registry.

Endpoints: POST /v1/chunk, GET /v1/health, GET /metrics (Prometheus), POST /v1/warm.
Set a shared cluster token with PEERPULL_PEER_TOKEN (or [peer] token in the config file):
requests without it are refused. Stops cleanly on SIGTERM or Ctrl-C.

examples:
  peerpull peer --listen 0.0.0.0:7470 --cache-dir /var/lib/peerpull/cache
  peerpull peer --discovery static --peer 10.0.0.2:7470 --peer 10.0.0.3:7470
  peerpull peer --discovery dns --dns-name peerpull.kube-system.svc.cluster.local
"""


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("peer", help="run the chunk cache and peer server of this node",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_peer_options(p)
    p.set_defaults(handler=run)
    return p


def add_peer_options(p: argparse.ArgumentParser) -> None:
    """The peer flags `peerpull peer` and `peerpull daemon` share."""
    from peerpull.cli import parse_size

    p.add_argument("--listen", type=_listen, metavar="HOST:PORT", help="where to serve peers (default 0.0.0.0:7470)")
    p.add_argument("--advertise", metavar="HOST", help="address other nodes reach this one on (default: guessed)")
    p.add_argument("--node-id", help="this node's id in the hash ring (default: host name)")
    p.add_argument("--cache-dir", metavar="DIR", help="chunk cache directory (default /var/lib/peerpull/cache)")
    p.add_argument("--cache-size", type=parse_size, metavar="SIZE", help="cache size limit, LRU-evicted (default 20GiB)")
    p.add_argument("--discovery", choices=("zeroconf", "static", "dns", "none"), help="how to find other nodes")
    p.add_argument("--peer", dest="peers", action="append", metavar="HOST:PORT", help="a static peer (repeatable)")
    p.add_argument("--dns-name", metavar="NAME", help="DNS name listing the nodes (with --discovery dns)")


async def run_until_stopped(service: Coroutine[Any, Any, None]) -> int:
    """Run a long-lived service until SIGTERM or Ctrl-C cancels it (its own teardown then runs)."""
    task = asyncio.ensure_future(service)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    return 0


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    return await run_until_stopped(PeerNode(config.peer, config.registry).run())
