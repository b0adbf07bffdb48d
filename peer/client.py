"""Asking another node for chunks: one aiohttp session, explicit timeouts, bounded answers.

Every request has a connect timeout, an idle read timeout (no byte for that long) and an overall
deadline. An answer is a stream of msgpack items, read as it arrives: each item resolves its
chunk at once, no item may be larger than its chunk's frame can be, and the whole answer no
larger than the frames requested, so a peer can neither stall a reader forever nor make it
buffer more than it asked for.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgpack

from converter.format.errors import PeerpullError
from peer.batching import Batch, BatchQueue, oldest
from peer.chunk import ChunkRef
from peer.summary import FILTER_BYTES

PROTOCOL_VERSION = "2"  # 2: /v1/chunks answers are a stream of [index, tier, frame]
PROTOCOL_HEADER = "X-Peerpull-Protocol"
TIER_HEADER = "X-Peerpull-Tier"
HOP_HEADER = "X-Peerpull-Hop"
CHUNKS_CONTENT_TYPE = "application/x-peerpull-chunks"
ITEM_OVERHEAD = 32  # msgpack framing of one [index, tier, frame] item
HEARTBEAT = (-1, "", b"")  # an item the server sends while it waits for the origin: keeps idle timeouts quiet
_HEARTBEAT_ITEM = list(HEARTBEAT)  # as msgpack decodes it
MAX_HEARTBEATS_BYTES = 64 << 10  # what heartbeats may add to an answer's size bound


class PeerFetchError(PeerpullError):
    """A peer did not deliver (refused, timed out, died mid-body, wrong size)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def frame_limit(ref: ChunkRef) -> int:
    """The largest frame a peer may send for `ref`: the TOC's compressed length, or what zstd can
    take at worst for the chunk's length (a peer may hold the same chunk compressed differently)."""
    return max(ref.compressed_length, ref.length + (ref.length >> 7) + 1024)


MAX_BATCH = 128  # chunks per request: amortizes HTTP and event-loop cost over many small chunks
INFLIGHT_PER_PEER = 4

_Waiters = dict[str, list["asyncio.Future[tuple[bytes, str]]"]]


class PeerClient:
    """Chunk requests to one peer that wait for a free slot are sent together in one batch."""

    def __init__(self, session: aiohttp.ClientSession, token: str, timeout_s: float,
                 connect_timeout_s: float = 2.0, read_timeout_s: float = 5.0) -> None:
        self._session = session
        self._headers = {**auth_headers(token), HOP_HEADER: "1", "Content-Type": "application/msgpack"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(connect_timeout_s, timeout_s),
                                              sock_read=min(read_timeout_s, timeout_s))
        self._queue: BatchQueue[str, ChunkRef, tuple[bytes, str]] = BatchQueue(
            self._send, oldest(MAX_BATCH), send_others=True)
        self._slots: dict[str, asyncio.Semaphore] = {}

    async def fetch_frame(self, address: str, ref: ChunkRef) -> tuple[bytes, str]:
        """(compressed frame, tier that produced it at the peer). Not verified here: the caller does."""
        slots = self._slots.get(address)
        if slots is None:
            slots = self._slots[address] = asyncio.Semaphore(INFLIGHT_PER_PEER)
        return await self._queue.submit(address, ref, lambda: slots)

    async def _send(self, address: str, batch: Batch[ChunkRef, tuple[bytes, str]]) -> None:
        waiters: _Waiters = {}
        refs: list[ChunkRef] = []
        for ref, future in batch:  # one request per digest, whoever waits for it
            if ref.digest not in waiters:
                waiters[ref.digest] = []
                refs.append(ref)
            waiters[ref.digest].append(future)
        await self._post(address, refs, waiters)  # a failure reaches every waiter of the batch

    async def _post(self, address: str, refs: list[ChunkRef], waiters: _Waiters) -> None:
        body = msgpack.packb([ref.pack() for ref in refs], use_bin_type=True)
        limits = [frame_limit(ref) for ref in refs]
        total_limit = sum(limits) + ITEM_OVERHEAD * len(refs) + MAX_HEARTBEATS_BYTES
        unpacker = msgpack.Unpacker(raw=False, max_bin_len=max(limits), max_buffer_size=max(limits) + (4 << 20))
        pending = dict(enumerate(refs))  # index → ref, until its item arrives
        received = 0
        answering = False  # the peer's answer has begun: a reset from here on is a death mid-answer
        try:
            async with self._session.post(f"http://{address}/v1/chunks", data=body, headers=self._headers,
                                          timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise PeerFetchError(f"peer {address} answered HTTP {resp.status}", f"http_{resp.status}")
                if resp.headers.get(PROTOCOL_HEADER) != PROTOCOL_VERSION:
                    raise PeerFetchError(f"peer {address} speaks another protocol version", "protocol")
                answering = True
                async for data in resp.content.iter_any():
                    received += len(data)
                    if received > total_limit:
                        raise PeerFetchError(f"peer {address} sent more than was asked for", "oversized")
                    unpacker.feed(data)
                    for item in unpacker:  # read to the end: the connection is then reused
                        self._deliver(address, item, pending, waiters, limits)
        except msgpack.BufferFull:
            raise PeerFetchError(f"peer {address} sent an oversized item", "oversized") from None
        except (ValueError, msgpack.UnpackException):
            raise PeerFetchError(f"peer {address} sent a malformed answer", "malformed") from None
        except TimeoutError:
            raise PeerFetchError(f"peer {address} timed out", "timeout") from None
        except aiohttp.ClientConnectorError:
            raise PeerFetchError(f"peer {address} refused the connection", "refused") from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError):
            raise PeerFetchError(f"peer {address} died mid-body", "truncated") from None
        except aiohttp.ClientOSError as exc:  # e.g. a connection reset by a peer that was killed
            if answering:
                raise PeerFetchError(f"peer {address} died mid-body ({exc.strerror or exc})", "truncated") from None
            raise PeerFetchError(f"peer {address}: connection failed ({exc.strerror or exc})", "reset") from None
        except aiohttp.ClientError as exc:
            raise PeerFetchError(f"peer {address}: {type(exc).__name__}", type(exc).__name__) from None
        if pending:
            raise PeerFetchError(f"peer {address} ended its answer early", "truncated")

    @staticmethod
    def _deliver(address: str, item: object, pending: dict[int, ChunkRef], waiters: _Waiters,
                 limits: list[int]) -> None:
        if item == _HEARTBEAT_ITEM:
            return
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int) and item[0] in pending
                and isinstance(item[1], str) and isinstance(item[2], bytes) and len(item[2]) <= limits[item[0]]):
            raise ValueError("malformed item")
        index, tier, frame = item
        ref = pending.pop(index)
        for future in waiters.pop(ref.digest, []):
            if future.done():
                continue
            if tier and frame:
                future.set_result((frame, tier))
            else:
                future.set_exception(PeerFetchError(f"peer {address} could not obtain {ref.digest}", "unavailable"))
                future.exception()

    async def summary(self, address: str) -> bytes:
        """The peer's holdings filter (peer/summary.py): exactly FILTER_BYTES, or a PeerFetchError."""
        try:
            async with self._session.get(f"http://{address}/v1/summary", headers=self._headers,
                                         timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise PeerFetchError(f"peer {address} summary: HTTP {resp.status}", f"http_{resp.status}")
                body = await resp.content.read(FILTER_BYTES + 1)
                while len(body) < FILTER_BYTES + 1 and (more := await resp.content.read(FILTER_BYTES + 1 - len(body))):
                    body += more
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PeerFetchError(f"peer {address} summary: {type(exc).__name__}", "summary") from None
        if len(body) != FILTER_BYTES:
            raise PeerFetchError(f"peer {address} summary: {len(body)} bytes, expected {FILTER_BYTES}", "summary")
        return body

    async def health(self, address: str) -> dict[str, object]:
        try:
            async with self._session.get(f"http://{address}/v1/health", headers=self._headers,
                                         timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise PeerFetchError(f"peer {address} health: HTTP {resp.status}", f"http_{resp.status}")
                body = await resp.content.read(4096)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PeerFetchError(f"peer {address} health: {type(exc).__name__}", "health") from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("node_id"), str):
            raise PeerFetchError(f"peer {address} health: malformed answer", "health")
        if answer.get("protocol") != PROTOCOL_VERSION:
            raise PeerFetchError(f"peer {address} speaks protocol {answer.get('protocol')!r}, "
                                 f"this node {PROTOCOL_VERSION}", "protocol")
        return answer

