"""Asking another node for a chunk: one aiohttp session, explicit timeouts, bounded answers."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import msgpack

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


MAX_BATCH = 128  # chunks per request: amortizes HTTP and event-loop cost over many small chunks
INFLIGHT_PER_PEER = 4


class PeerClient:
    """Chunk requests to one peer that wait for a free slot are sent together in one batch."""

    def __init__(self, session: aiohttp.ClientSession, token: str, timeout_s: float) -> None:
        self._session = session
        self._headers = {**auth_headers(token), HOP_HEADER: "1", "Content-Type": "application/msgpack"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(2.0, timeout_s))
        # per peer, requests waiting to be sent, oldest first (a dict: O(1) membership and removal)
        self._queues: dict[str, dict[asyncio.Future[tuple[bytes, str]], ChunkRef]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}

    async def fetch_frame(self, address: str, ref: ChunkRef) -> tuple[bytes, str]:
        """(compressed frame, tier that produced it at the peer). Not verified here: the caller does."""
        future: asyncio.Future[tuple[bytes, str]] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(address, {})
        queue[future] = ref
        slots = self._slots.setdefault(address, asyncio.Semaphore(INFLIGHT_PER_PEER))
        try:
            async with slots:
                # still queued: send the oldest batch (ours, or ours goes with a later one: every
                # queued request has a waiter, and the last of them always sends its own)
                if future in queue:
                    batch = [(queue.pop(f), f) for f in list(itertools.islice(queue, MAX_BATCH))]
                    await self._send(address, batch)
        except BaseException:
            queue.pop(future, None)
            if not future.done():
                future.cancel()
            raise
        return await future

    async def _send(self, address: str, batch: list[tuple[ChunkRef, asyncio.Future[tuple[bytes, str]]]]) -> None:
        body = msgpack.packb([ref.pack() for ref, _ in batch], use_bin_type=True)
        limit = sum(2 * ref.compressed_length + 64 for ref, _ in batch) + 1024
        try:
            answers = await self._post(address, body, limit)
        except PeerFetchError as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()
            return
        for (ref, future), answer in zip(batch, answers):
            if future.done():
                continue
            if isinstance(answer, list) and len(answer) == 2 and answer[0] and isinstance(answer[1], bytes):
                future.set_result((answer[1], str(answer[0])))
            else:
                future.set_exception(PeerFetchError(f"peer {address} could not obtain {ref.digest}", "unavailable"))
                future.exception()

    async def _post(self, address: str, body: bytes, limit: int) -> list[object]:
        try:
            async with self._session.post(f"http://{address}/v1/chunks", data=body, headers=self._headers,
                                          timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise PeerFetchError(f"peer {address} answered HTTP {resp.status}", f"http_{resp.status}")
                length = resp.content_length
                if length is None or length > limit:
                    raise PeerFetchError(f"peer {address} sent an answer of unknown or excessive size", "oversized")
                raw = await resp.content.readexactly(length)
        except (asyncio.IncompleteReadError, aiohttp.ClientPayloadError):
            raise PeerFetchError(f"peer {address} died mid-body", "truncated") from None
        except aiohttp.ClientConnectorError:
            raise PeerFetchError(f"peer {address} refused the connection", "refused") from None
        except TimeoutError:
            raise PeerFetchError(f"peer {address} timed out", "timeout") from None
        except aiohttp.ClientError as exc:
            raise PeerFetchError(f"peer {address}: {type(exc).__name__}", type(exc).__name__) from None
        try:
            answers = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException, TypeError):
            raise PeerFetchError(f"peer {address} sent a malformed answer", "malformed") from None
        if not isinstance(answers, list):
            raise PeerFetchError(f"peer {address} sent a malformed answer", "malformed")
        return answers

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
