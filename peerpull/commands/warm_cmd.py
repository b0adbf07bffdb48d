"""`peerpull warm IMAGE`: have a node fetch every chunk of an image before traffic arrives."""

from __future__ import annotations

import argparse
import json
from typing import Any

import aiohttp

from converter.errors import PeerpullError, RegistryUnreachableError
from peer.client import auth_headers
from peerpull.config import PeerpullConfig

DESCRIPTION = """\
Ask a running node (`peerpull peer` or the node daemon) to fetch every chunk of a seekable image
into its cache, through the ordinary path: local cache, then the chunk's owner node, then the
registry. Run it on every node before a traffic spike (the Helm chart's warm-up Job does).
Prints what each tier served, as JSON.
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("warm", help="fetch an image's chunks into a node's cache ahead of time",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", help="registry reference of a seekable image")
    p.add_argument("--node", default="127.0.0.1:7470", metavar="HOST:PORT", help="the node to warm (default %(default)s)")
    p.set_defaults(handler=run)
    return p


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    url = f"http://{args.node}/v1/warm"
    try:
        # the node answers once the whole image is warm: no total deadline, only for connecting
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(url, json={"image": args.image}, headers=auth_headers(config.peer.token)) as resp:
                text = await resp.text()
                if resp.status == 401:
                    raise PeerpullError(f"node {args.node} refused the request: set the cluster token (PEERPULL_PEER_TOKEN)")
                if resp.status != 200:
                    raise PeerpullError(f"node {args.node} could not warm {args.image}: {text.strip()[:300]}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RegistryUnreachableError(f"cannot reach node {args.node}: {exc or type(exc).__name__}") from None
    print(json.dumps(json.loads(text), indent=2))
    return 0
