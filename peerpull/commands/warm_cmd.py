"""`peerpull warm IMAGE`: have a node fetch every chunk of an image before traffic arrives."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiohttp
import structlog

from converter.format import errors
from converter.format.errors import AuthError, ConfigError, PeerpullError, RegistryUnreachableError
from peer.client import auth_headers
from peerpull.config import PeerpullConfig
from peerpull.progress import Progress

log = structlog.get_logger(__name__)
MAX_LINE = 1 << 20  # a progress or final line; anything longer is not a node speaking

DESCRIPTION = """\
Ask a running node (`peerpull peer` or the node daemon) to fetch every chunk of a seekable image
into its cache, through the ordinary path: local cache, then the chunk's owner node, then the
registry. Run it on every node before a traffic spike (the Helm chart's warm-up Job does).
The node reports progress every few seconds (logged as `warm_progress`); the final report, by
serving tier, is printed as JSON.

Across a cluster, name every node (--node A --node B …): all warm at once and split the work by
the hash ring, each fetching only its own share from the registry and the rest from the owners
(peer.warm_split; see docs/peers.md), so the registry sends the image about once. The report is
then {"seconds": …, "nodes": {NODE: report, …}}.

Examples:
  peerpull warm registry.example/app:1
  peerpull warm registry.example/app:1 --node 10.0.0.1:7470 --node 10.0.0.2:7470 --node 10.0.0.3:7470

The node fetches only from registries it trusts (peer.trusted_registries, or those its own
snapshotter uses); asked on loopback (--node 127.0.0.1:…) it trusts the image's registry itself.

Deadlines: --connect-timeout (default 10 s), --idle-timeout: the node sent nothing for that long
(default 60 s; a node reports progress every 5 s), --timeout for the whole warm-up (default
3600 s). Exit codes: 0 warmed; 1 the node could not warm the image, or a deadline passed;
2 the node does not trust the image's registry; 5 the node cannot be reached; 6 the node refused
the cluster token; the node's own exit code for errors it reports (e.g. 7 image not found).
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("warm", help="fetch an image's chunks into a node's cache ahead of time",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", help="registry reference of a seekable image")
    p.add_argument("--node", action="append", metavar="HOST:PORT",
                   help="a node to warm; repeat it to warm several at once (default 127.0.0.1:7470)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                   help="give up after this many seconds in all (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                   help="give up when the node sends nothing for this long (default %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="give up connecting after this long (default %(default)s)")
    p.set_defaults(handler=run)
    return p


_RELAYED = (errors.NotFoundError, errors.AuthError, errors.RegistryUnreachableError, errors.RegistryError,
            errors.FormatError, errors.UnsupportedError, errors.ConfigError)


def _node_error(message: str, error_type: object) -> PeerpullError:
    """The node's error class (by name), so this command exits with the same code."""
    cls = getattr(errors, error_type, None) if isinstance(error_type, str) else None
    if isinstance(cls, type) and issubclass(cls, _RELAYED):
        return cls(message)
    return PeerpullError(message)


async def _warm(node: str, args: argparse.Namespace, config: PeerpullConfig) -> dict[str, Any]:
    # one bar on a terminal for one node; several nodes at once log their events (one live bar at a time)
    tty = False if len(args.node or ()) > 1 else None
    with Progress("warm_progress", f"warming {args.image} on {node}", tty=tty, node=node, image=args.image) as bar:
        return await _warm_with(node, args, config, bar)


async def _warm_with(node: str, args: argparse.Namespace, config: PeerpullConfig, bar: Progress) -> dict[str, Any]:
    url = f"http://{node}/v1/warm"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=args.connect_timeout, sock_read=args.idle_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url, json={"image": args.image}, headers=auth_headers(config.peer.token)) as resp:
            if resp.status == 401:
                raise AuthError(f"node {node} refused the request: set the cluster token (PEERPULL_PEER_TOKEN)")
            if resp.status == 403:
                text = (await resp.content.read(4096)).decode(errors="replace")
                raise ConfigError(f"node {node} refused to warm {args.image}: {text.strip()[:300]}")
            if resp.status != 200:
                text = (await resp.content.read(4096)).decode(errors="replace")
                raise PeerpullError(f"node {node} could not warm {args.image}: HTTP {resp.status} {text.strip()[:300]}")
            buffered = b""
            while True:
                if b"\n" not in buffered:
                    if len(buffered) > MAX_LINE:
                        raise PeerpullError(f"node {node} sent a malformed warm-up answer (a line over 1 MiB)")
                    data = await resp.content.readany()  # sock_read bounds each wait
                    if not data:
                        raise PeerpullError(f"node {node} ended the warm-up of {args.image} without a report "
                                            "(did it restart? see its log)")
                    buffered += data
                    continue
                line, _, buffered = buffered.partition(b"\n")
                try:
                    record = json.loads(line)
                except ValueError:
                    raise PeerpullError(f"node {node} sent a malformed warm-up answer") from None
                event = record.get("event") if isinstance(record, dict) else None
                if event == "progress":  # a bar on a terminal, else the warm_progress event as before
                    bar.update(**_warm_fields(record))
                elif event == "done" and isinstance(record.get("report"), dict):
                    return record["report"]
                elif event == "error":
                    raise _node_error(f"node {node} could not warm {args.image}: {record.get('error')}",
                                      record.get("error_type"))
                else:
                    raise PeerpullError(f"node {node} sent a malformed warm-up answer")


async def _warm_one(node: str, args: argparse.Namespace, config: PeerpullConfig) -> dict[str, Any]:
    """One node's report, or its error as one PeerpullError naming the node."""
    try:
        return await _warm(node, args, config)
    except aiohttp.ConnectionTimeoutError:
        raise RegistryUnreachableError(f"cannot reach node {node}: no connection within "
                                       f"{args.connect_timeout:g} s (--connect-timeout)") from None
    except aiohttp.ServerTimeoutError:
        raise PeerpullError(f"node {node} sent nothing for {args.idle_timeout:g} s while warming {args.image}: "
                            "it may be hung (see its log), or raise --idle-timeout") from None
    except aiohttp.ClientConnectorError as exc:
        raise RegistryUnreachableError(f"cannot reach node {node}: {exc.strerror or exc}") from None
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise RegistryUnreachableError(f"lost node {node}: {' '.join(str(exc).split()) or type(exc).__name__}") from None


async def _warm_all(nodes: list[str], args: argparse.Namespace, config: PeerpullConfig) -> list[dict[str, Any]]:
    """Every node at once (a split warm-up needs each fetching its share while the others take it);
    the first error ends the others."""
    tasks = [asyncio.ensure_future(_warm_one(node, args, config)) for node in nodes]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _warm_fields(record: dict[str, Any]) -> dict[str, Any]:
    done, chunks, stage, size = (record.get(k) for k in ("done", "chunks", "stage", "bytes"))
    fields: dict[str, Any] = {"stage": stage, "chunks": chunks, "done": done, "bytes": size,
                              "share": record.get("share"), "waiting": record.get("waiting")}
    if isinstance(done, int) and isinstance(chunks, int) and chunks:
        fields.update(completed=done, total=chunks)
    fields["text"] = f"{stage} {size if isinstance(size, int) else 0} bytes"
    return fields


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    for name in ("timeout", "idle_timeout", "connect_timeout"):
        if not 0 < getattr(args, name) <= 7 * 86400:
            raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 604800 seconds")
    nodes = list(dict.fromkeys(args.node or ["127.0.0.1:7470"]))
    started = time.monotonic()
    try:
        async with asyncio.timeout(args.timeout):
            reports = await _warm_all(nodes, args, config)
    except TimeoutError:
        where = nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes"
        raise PeerpullError(f"warming {args.image} on {where} did not finish within {args.timeout:g} s "
                            "(--timeout)") from None
    if len(nodes) == 1:
        print(json.dumps(reports[0], indent=2))
    else:
        print(json.dumps({"seconds": round(time.monotonic() - started, 3), "nodes": dict(zip(nodes, reports))},
                         indent=2))
    return 0
