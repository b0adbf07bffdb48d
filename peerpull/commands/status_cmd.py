"""`peerpull status`: what a running node holds and does, for a person (or as JSON)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from converter.format.errors import ConfigError
from peerpull.config import PeerpullConfig
from peerpull.status.client import fetch_status, local_node_address
from peerpull.status.render import render

DESCRIPTION = """\
Ask a running node (the node daemon, or `peerpull peer`) for its status: the images it serves
lazily and how much of each is local (chunks in the cache ÷ the image's chunks), its cache use
and limit, the hit ratio and bytes by tier (cache, peer, origin) since it started, the members it
sees and their health, and its recent warnings and errors (lazy-layer fallbacks among them).
The node is this host's by default (peer.listen_port); the cluster token is sent when set.

Exit codes: 0 ok, 2 bad usage, 5 the node cannot be reached, 6 the node refused the token.

examples:
  peerpull status
  peerpull status --json | jq '.images[] | {image, local_ratio}'
  peerpull status --watch 2          # redraw every 2 s on a terminal (Ctrl-C ends it)
  peerpull status --node 10.0.0.7:7470
"""
CLEAR = "\x1b[H\x1b[2J"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("status", help="a running node's images, cache, tiers, members and recent errors",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", metavar="HOST:PORT", help="the node to ask (default: this host's, peer.listen_port)")
    p.add_argument("--json", action="store_true", help="print the node's answer as JSON (images, tiers, members, …)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="S",
                   help="refresh every S seconds (default 2) until interrupted")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per request (default %(default)s)")
    p.set_defaults(handler=run)
    return p


def _page(status: dict[str, Any], node: str, as_json: bool) -> str:
    return json.dumps(status, indent=2) if as_json else "\n".join(render(status, node))


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    if args.watch is not None and not 0.1 <= args.watch <= 3600:
        raise ConfigError("--watch must be between 0.1 and 3600 seconds")
    if not 0 < args.timeout <= 600:
        raise ConfigError("--timeout must be between 0 and 600 seconds")
    node = args.node or local_node_address(config.peer)
    while True:
        page = _page(await fetch_status(node, config.peer.token, args.timeout), node, args.json)
        if args.watch is None:
            print(page)
            return 0
        # on a terminal the page is redrawn in place; elsewhere each refresh is appended
        print((CLEAR if sys.stdout.isatty() else "") + page, flush=True)
        await asyncio.sleep(args.watch)
