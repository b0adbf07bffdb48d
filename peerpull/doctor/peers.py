"""The peer side: a cluster token wherever the server listens beyond loopback, static peers reachable."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from peer.client import PROTOCOL_VERSION
from peer.node import is_loopback_host
from peerpull.doctor.check import CheckResult, DoctorContext, failed, ok


async def check_peers(context: DoctorContext) -> list[CheckResult]:
    p = context.config.peer
    results = [_token(context)]
    if not p.static_peers:
        results.append(ok("peers_reachable", f"no static peers configured (discovery: {p.discovery})"))
        return results
    timeout = aiohttp.ClientTimeout(total=context.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        answers = await asyncio.gather(*(_health(session, a) for a in p.static_peers))
    bad = [f"{address} ({why})" for address, why in zip(p.static_peers, answers) if why]
    if bad:
        results.append(failed("peers_reachable", f"{len(bad)} of {len(p.static_peers)} peers do not answer "
                                                 f"/v1/health: {', '.join(bad)[:400]}; check peer.static_peers and "
                                                 "that the port is open between nodes"))
    else:
        results.append(ok("peers_reachable", f"all {len(p.static_peers)} static peers answer /v1/health"))
    return results


def _token(context: DoctorContext) -> CheckResult:
    p = context.config.peer
    where = f"{p.listen_host}:{p.listen_port}"
    if is_loopback_host(p.listen_host):
        return ok("peer_token", f"the peer server listens on loopback ({where}): no token needed")
    if p.token:
        return ok("peer_token", f"a cluster token is set for the peer server on {where}")
    if p.insecure_no_token:
        return ok("peer_token", f"the peer server on {where} is open to anyone on the network "
                                "(peer.insecure_no_token = true, by choice)")
    return failed("peer_token", f"no cluster token while the peer server listens on {where}: set PEERPULL_PEER_TOKEN "
                                "(or [peer] token) on every node, or listen on 127.0.0.1")


async def _health(session: aiohttp.ClientSession, address: str) -> str:
    """'' when healthy, else why not."""
    try:
        async with session.get(f"http://{address}/v1/health") as resp:
            if resp.status != 200:
                return f"HTTP {resp.status}"
            answer = json.loads(await resp.content.read(4096))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return type(exc).__name__
    except ValueError:
        return "malformed answer"
    if not isinstance(answer, dict) or answer.get("protocol") != PROTOCOL_VERSION:
        return "another peer protocol"
    return ""
