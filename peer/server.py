"""The peer endpoints of a node (aiohttp): chunks by digest, health, metrics, warm-up.

Only content-addressed chunks are served, never paths or listings. With a cluster token set,
every endpoint but /metrics requires it. Request bodies are small and bounded, and at most
`max_concurrent_serves` chunk requests are served at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Awaitable, Callable

import msgpack
import structlog
from aiohttp import web

from converter.errors import FormatError, PeerpullError
from peer.cache import ChunkCache
from peer.chunk import MAX_HINT_BYTES, ChunkRef
from peer.client import MAX_BATCH, PROTOCOL_VERSION, TIER_HEADER
from peer.fetcher import ChunkFetcher, Fetched
from peer.metrics import PeerMetrics

log = structlog.get_logger(__name__)
WarmHandler = Callable[[str], Awaitable[dict[str, object]]]


class PeerServer:
    def __init__(self, node_id: str, fetcher: ChunkFetcher, cache: ChunkCache, metrics: PeerMetrics, token: str,
                 max_concurrent: int, warm: WarmHandler | None = None) -> None:
        self._node_id = node_id
        self._cache = cache
        self._fetcher = fetcher
        self._metrics = metrics
        self._token = token
        self._slots = asyncio.Semaphore(max_concurrent)
        self._warm = warm

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BATCH * MAX_HINT_BYTES, middlewares=[self._auth])
        app.router.add_post("/v1/chunk", self._chunk)
        app.router.add_post("/v1/chunks", self._chunks)
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/metrics", self._metrics_endpoint)
        app.router.add_post("/v1/warm", self._warm_endpoint)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self._token and request.path != "/metrics":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
                self._metrics.refused.labels("token").inc()
                log.warning("peer_request_refused", reason="token", remote=request.remote, path=request.path)
                return web.Response(status=401, text="cluster token required")
        return await handler(request)

    async def _chunk(self, request: web.Request) -> web.StreamResponse:
        body = await request.content.read(MAX_HINT_BYTES + 1)
        try:
            ref = ChunkRef.unpack(body)
        except FormatError as exc:
            self._metrics.refused.labels("malformed").inc()
            return web.Response(status=400, text=str(exc))
        fetched = await self._serve_one(ref)
        if fetched is None:
            return web.Response(status=502, text="could not obtain the chunk")
        return web.Response(body=fetched.frame, content_type="application/zstd", headers={TIER_HEADER: fetched.tier})

    async def _serve_one(self, ref: ChunkRef) -> Fetched | None:
        async with self._slots:
            try:
                fetched = await self._fetcher.fetch(ref, use_peers=False)
            except PeerpullError as exc:
                log.warning("peer_serve_failed", digest=ref.digest, error=str(exc))
                return None
        self._metrics.served.labels(fetched.tier).inc()
        self._metrics.served_bytes.inc(len(fetched.frame))
        return fetched

    async def _chunks(self, request: web.Request) -> web.StreamResponse:
        """A batch: msgpack list of packed chunk requests → list of [tier, frame] ("" and b"" if unavailable)."""
        try:
            items = msgpack.unpackb(await request.read(), raw=False)
            if not isinstance(items, list) or len(items) > MAX_BATCH or not all(isinstance(i, bytes) for i in items):
                raise FormatError("a batch is a list of at most 128 packed chunk requests")
            refs = [ChunkRef.unpack(item) for item in items]
        except (FormatError, ValueError, msgpack.UnpackException, TypeError) as exc:
            self._metrics.refused.labels("malformed").inc()
            return web.Response(status=400, text=str(exc))
        cached = await asyncio.to_thread(self._cache.load_many, refs)  # verified, in one worker hop
        misses = [ref for ref, hit in zip(refs, cached) if hit is None]
        fetched = dict(zip((r.digest for r in misses), await asyncio.gather(*(self._serve_one(r) for r in misses))))
        answer = []
        for ref, hit in zip(refs, cached):
            if hit is not None:
                answer.append(["cache", hit[0]])
                self._metrics.served.labels("cache").inc()
                self._metrics.served_bytes.inc(len(hit[0]))
            elif (f := fetched.get(ref.digest)) is not None:
                answer.append([f.tier, f.frame])
            else:
                answer.append(["", b""])
        return web.Response(body=msgpack.packb(answer, use_bin_type=True), content_type="application/msgpack")

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"node_id": self._node_id, "protocol": PROTOCOL_VERSION})

    async def _metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), content_type="text/plain", charset="utf-8")

    async def _warm_endpoint(self, request: web.Request) -> web.Response:
        if self._warm is None:
            return web.Response(status=404)
        try:
            image = (await request.json())["image"]
            if not isinstance(image, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text='expected {"image": "<reference>"}')
        try:
            report = await self._warm(image)
        except PeerpullError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        return web.Response(text=json.dumps(report), content_type="application/json")
