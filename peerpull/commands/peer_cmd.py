"""`peerpull peer`: run the node's chunk fetcher and peer server alone."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
from collections.abc import Coroutine
from typing import Any

from peer.config import DISCOVERY_MODES
from peer.node import PeerNode
from peerpull.config import PeerpullConfig
from peerpull.options import parse_listen, parse_size

DESCRIPTION = """\
Run this node's chunk cache and peer server: it serves chunks it holds (by digest, verified) to
the other nodes, finds them by zeroconf (or a static list, or DNS), and fetches each chunk a
warm-up asks for from the cheapest tier — local disk, the chunk's owner node, the registry.

Endpoints: POST /v1/chunks, POST /v1/warm (both need the token), GET /v1/health and GET /metrics
(open, for probes). Set a shared cluster token with PEERPULL_PEER_TOKEN (or [peer] token): without
one, listening on a non-loopback address is refused unless --insecure-no-token is given.
A node fetches a chunk another node asks for only from a registry it trusts: peer.trusted_registries
("*" for any), or one its own snapshotter (or a warm-up asked on loopback) uses.

Limits (config [peer], defaults): connections 2048 (max_connections), a whole request within 10 s
of connecting (header_timeout_s), 32 MiB answered per connection and 64 MiB in all at once
(serve_connection_bytes, serve_total_bytes), 64 origin fetches for peers at once, each given up
after 30 s (max_concurrent_serves, serve_origin_timeout_s). Requests to other nodes: connect 2 s,
idle 5 s, overall 10 s (peer_connect_timeout_s, peer_read_timeout_s, peer_timeout_s).
Start-up problems (port in use, an address not of this host, no token, an unwritable cache
directory) end with one line and exit 2. Stops cleanly on SIGTERM or Ctrl-C.

examples:
  peerpull peer --listen 0.0.0.0:7470 --cache-dir /var/lib/peerpull/cache
  peerpull peer --discovery static --peer 10.0.0.2:7470 --peer 10.0.0.3:7470
  peerpull peer --discovery dns --dns-name peerpull.kube-system.svc.cluster.local
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("peer", help="run the chunk cache and peer server of this node",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_peer_options(p)
    p.set_defaults(handler=run)
    return p


def add_peer_options(p: argparse.ArgumentParser) -> None:
    """The peer flags `peerpull peer` and `peerpull daemon` share."""
    p.add_argument("--listen", type=parse_listen, metavar="HOST:PORT", help="where to serve peers (default 0.0.0.0:7470)")
    p.add_argument("--advertise", metavar="HOST", help="address other nodes reach this one on (default: guessed)")
    p.add_argument("--node-id", help="this node's id in the hash ring (default: host name)")
    p.add_argument("--cache-dir", metavar="DIR", help="chunk cache directory (default /var/lib/peerpull/cache)")
    p.add_argument("--cache-size", type=parse_size, metavar="SIZE", help="cache size limit, LRU-evicted (default 20GiB)")
    p.add_argument("--discovery", choices=DISCOVERY_MODES, help="how to find other nodes")
    p.add_argument("--peer", dest="peers", action="append", metavar="HOST:PORT", help="a static peer (repeatable)")
    p.add_argument("--dns-name", metavar="NAME", help="DNS name listing the nodes (with --discovery dns)")
    p.add_argument("--insecure-no-token", action="store_true", default=None,
                   help="serve peers on a non-loopback address without a cluster token (anyone on the network "
                        "may then use this node; default: refused)")
    p.add_argument("--trust-registry", dest="trusted_registries", action="append", metavar="HOST[:PORT]",
                   help="a registry this node fetches from when a peer asks (repeatable; '*' for any; "
                        "default: only those its own snapshotter uses)")


def with_peer_flags(args: argparse.Namespace, config: PeerpullConfig) -> PeerpullConfig:
    """Apply the peer flags the generic flag mapping does not know."""
    changes: dict[str, Any] = {}
    if getattr(args, "insecure_no_token", None):
        changes["insecure_no_token"] = True
    if getattr(args, "trusted_registries", None):
        changes["trusted_registries"] = (*config.peer.trusted_registries, *args.trusted_registries)
    if not changes:
        return config
    return dataclasses.replace(config, peer=dataclasses.replace(config.peer, **changes))


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
    config = with_peer_flags(args, config)
    return await run_until_stopped(PeerNode(config.peer, config.registry).run())
