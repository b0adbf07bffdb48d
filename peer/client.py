"""Asking another node for a chunk: one aiohttp session, explicit timeouts, bounded answers."""

from __future__ import annotations

import asyncio

import aiohttp

from converter.errors import PeerpullError
from peer.chunk import ChunkRef

PROTOCOL_VERSION = "1"
TIER_HEADER = "X-Peerpull-Tier"
HOP_HEADER = "X-Peerpull-Hop"


class PeerFetchError(PeerpullError):
    """A peer did not deliver (refused, timed out, died mid-body, wrong size)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class PeerClient:
    def __init__(self, session: aiohttp.ClientSession, token: str, timeout_s: float) -> None:
        self._session = session
        self._headers = {**auth_headers(token), HOP_HEADER: "1", "Content-Type": "application/msgpack"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(2.0, timeout_s))

    async def fetch_frame(self, address: str, ref: ChunkRef) -> tuple[bytes, str]:
        """(compressed frame, tier that produced it at the peer). Not verified here: the caller does."""
        try:
            async with self._session.post(f"http://{address}/v1/chunk", data=ref.pack(), headers=self._headers,
                                          timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise PeerFetchError(f"peer {address} answered HTTP {resp.status}", f"http_{resp.status}")
                length = resp.content_length
                if length is None or length > 2 * ref.compressed_length + 1024:
                    raise PeerFetchError(f"peer {address} sent a frame of unknown or excessive size", "oversized")
                frame = await resp.content.readexactly(length)
                return frame, resp.headers.get(TIER_HEADER, "unknown")
        except (asyncio.IncompleteReadError, aiohttp.ClientPayloadError):
            raise PeerFetchError(f"peer {address} died mid-body", "truncated") from None
        except aiohttp.ClientConnectorError:
            raise PeerFetchError(f"peer {address} refused the connection", "refused") from None
        except TimeoutError:
            raise PeerFetchError(f"peer {address} timed out", "timeout") from None
        except aiohttp.ClientError as exc:
            raise PeerFetchError(f"peer {address}: {type(exc).__name__}", type(exc).__name__) from None

    async def health(self, address: str) -> dict[str, str]:
        try:
            async with self._session.get(f"http://{address}/v1/health", headers=self._headers,
                                         timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise PeerFetchError(f"peer {address} health: HTTP {resp.status}", f"http_{resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PeerFetchError(f"peer {address} health: {type(exc).__name__}", "health") from None
        if not isinstance(body, dict) or not isinstance(body.get("node_id"), str):
            raise PeerFetchError(f"peer {address} health: malformed answer", "health")
        return body
