"""Asking a running node for its status (`GET /v1/status`), with one error line per way it can fail."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from converter.format.errors import AuthError, PeerpullError, RegistryUnreachableError
from peer.client import auth_headers
from peer.config import PeerConfig

MAX_ANSWER = 16 << 20  # a status page over this is not a node speaking


def local_node_address(peer: PeerConfig) -> str:
    """This host's own node as configured: its listen address, loopback for a wildcard."""
    host = peer.listen_host if peer.listen_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"[{host}]:{peer.listen_port}" if ":" in host else f"{host}:{peer.listen_port}"


async def fetch_status(node: str, token: str, timeout_s: float) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"http://{node}/v1/status", headers=auth_headers(token)) as resp:
                if resp.status == 401:
                    raise AuthError(f"node {node} refused the request: set the cluster token (PEERPULL_PEER_TOKEN)")
                if resp.status == 404:
                    raise PeerpullError(f"node {node} serves no /v1/status: it runs an older peerpull")
                if resp.status != 200:
                    raise PeerpullError(f"node {node} answered HTTP {resp.status} to /v1/status")
                body = await resp.content.read(MAX_ANSWER + 1)
    except aiohttp.ClientConnectorError as exc:
        raise RegistryUnreachableError(f"cannot reach node {node}: {exc.strerror or exc} (is `peerpull daemon` "
                                       "running? --node HOST:PORT)") from None
    except TimeoutError:
        raise RegistryUnreachableError(f"node {node} did not answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise RegistryUnreachableError(f"lost node {node}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    try:
        answer = json.loads(body) if len(body) <= MAX_ANSWER else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise PeerpullError(f"node {node} sent a malformed status")
    return answer
