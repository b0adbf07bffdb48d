"""The peer endpoints of a node (aiohttp): chunks by digest, health, holdings summary, metrics, warm-up.

Only content-addressed chunks are served, never paths or listings. With a cluster token set,
every endpoint but /v1/health and /metrics requires it (probes use those two).

`/v1/chunks` is built so that no client can make this node spend unbounded memory or time:
requested digests are deduplicated; the answer is streamed, one msgpack item per chunk as it is
ready, cache hits first; bytes held for answers are bounded per connection and in total
(`ByteBudget`); a miss is fetched only from a registry the `OriginPolicy` trusts, in its own
bounded slots with a deadline, so requests naming a silent host cannot hold what cache hits need.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import msgpack
import structlog
from aiohttp import web

from converter.format.digest import is_digest
from converter.format.errors import FormatError, PeerpullError
from converter.registry.reference import ImageReference
from peer.budget import ByteBudget
from peer.cache import ChunkCache, FrameFile
from peer.chunk import MAX_HINT_BYTES, ChunkRef
from peer.client import CHUNKS_CONTENT_TYPE, HEARTBEAT, MAX_BATCH, PROTOCOL_HEADER, PROTOCOL_VERSION
from peer.config import PeerConfig
from peer.fetcher import ChunkFetcher
from peer.metrics import PeerMetrics
from peer.policy import OriginPolicy
from peer.warm import WarmProgress

log = structlog.get_logger(__name__)
WarmHandler = Callable[[str, WarmProgress], Awaitable[dict[str, object]]]
ProfileReader = Callable[[str], Awaitable[bytes | None]]  # manifest digest → a stored startup profile
StatusReader = Callable[[], Awaitable[dict[str, object]]]  # peer/status.py: what /v1/status answers
MAX_PROFILE_ANSWER = 4 << 20  # a startup profile above this is not served (snapshotter/service/profiles.py)
OPEN_PATHS = ("/v1/health", "/metrics")  # served without the token: probes and scrapers have none
HIT_GROUP = 64  # cache hits loaded per worker hop (one SQLite query) and written in one piece ...
HIT_GROUP_BYTES = 1 << 20  # ... up to this many bytes of frames: small frames batch, big ones go alone
HEARTBEAT_S = 0.25  # while misses wait for the origin: well inside the asker's idle timeout (>= 1 s)


def _error_line(exc: BaseException) -> dict[str, object]:
    while isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = list(exc.exceptions)
        ours = [e for e in leaves if isinstance(e, PeerpullError)]
        exc = (ours or leaves)[0]
    if isinstance(exc, PeerpullError):
        return {"event": "error", "error": str(exc), "error_type": type(exc).__name__}
    return {"event": "error", "error": f"{type(exc).__name__}: {exc}", "error_type": "PeerpullError"}


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def item_head(index: int, tier: str, size: int) -> bytes:
    """The msgpack bytes of an answer item [index, tier, frame] that come before the frame's own
    bytes: a frame sent from its file follows this head on the wire."""
    if size < 1 << 8:
        bin_head = b"\xc4" + size.to_bytes(1, "big")
    elif size < 1 << 16:
        bin_head = b"\xc5" + size.to_bytes(2, "big")
    else:
        bin_head = b"\xc6" + size.to_bytes(4, "big")
    return b"\x93" + bytes(msgpack.packb(index)) + bytes(msgpack.packb(tier)) + bin_head


async def _write_items(request: web.Request, response: web.StreamResponse,
                       items: list[tuple[int, str, bytes | FrameFile]]) -> None:
    """Answer items on the chunked response: frames in memory packed into one write, a frame in a
    file as its item head (through aiohttp, which also sends the headers first) and then a chunk of
    its own written straight to the socket from the file."""
    pending: list[bytes] = []
    for index, tier, frame in items:
        if not isinstance(frame, FrameFile):
            pending.append(msgpack.packb([index, tier, frame], use_bin_type=True))
            continue
        pending.append(item_head(index, tier, len(frame)))
        await response.write(b"".join(pending))
        pending = []
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        try:
            transport.write(b"%x\r\n" % len(frame))
            await asyncio.get_running_loop().sendfile(transport, frame.file, 0, len(frame))
            transport.write(b"\r\n")
        except BaseException:
            transport.abort()  # a chunk cut short: this answer cannot go on
            raise
    if pending:
        await response.write(b"".join(pending))


def _hit_groups(maybe: list[tuple[int, ChunkRef]]) -> list[list[tuple[int, ChunkRef]]]:
    """Consecutive groups of at most HIT_GROUP chunks and HIT_GROUP_BYTES of frames (a frame above
    that goes alone)."""
    groups: list[list[tuple[int, ChunkRef]]] = []
    part: list[tuple[int, ChunkRef]] = []
    size = 0
    for item in maybe:
        length = item[1].compressed_length
        if part and (len(part) == HIT_GROUP or size + length > HIT_GROUP_BYTES):
            groups.append(part)
            part, size = [], 0
        part.append(item)
        size += length
    if part:
        groups.append(part)
    return groups


class PeerServer:
    def __init__(self, node_id: str, fetcher: ChunkFetcher, cache: ChunkCache, metrics: PeerMetrics,
                 config: PeerConfig, policy: OriginPolicy, warm: WarmHandler | None = None,
                 profiles: ProfileReader | None = None, status: StatusReader | None = None) -> None:
        self._node_id = node_id
        self._cache = cache
        self._fetcher = fetcher
        self._metrics = metrics
        self._config = config
        self._token = config.token
        self._policy = policy
        self._origin_slots = asyncio.Semaphore(config.max_concurrent_serves)
        self._total = ByteBudget(config.serve_total_bytes)
        # cache reads for peers on their own threads: never behind verification of origin frames
        self._cache_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="serve-cache")
        self._warm = warm
        self._profiles = profiles
        self._status = status

    @property
    def bytes_in_flight(self) -> int:
        """Bytes of answers to peers being sent (within serve_total_bytes)."""
        return self._total.used

    def app(self, middlewares: tuple[Callable[..., Awaitable[web.StreamResponse]], ...] = ()) -> web.Application:
        app = web.Application(client_max_size=MAX_BATCH * (MAX_HINT_BYTES + 8) + 1024,
                              middlewares=[*middlewares, self._auth])
        app.router.add_post("/v1/chunks", self._chunks)
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/v1/summary", self._summary)
        app.router.add_get("/metrics", self._metrics_endpoint)
        app.router.add_post("/v1/warm", self._warm_endpoint)
        app.router.add_get("/v1/profiles/{digest}", self._profile_endpoint)
        app.router.add_get("/v1/status", self._status_endpoint)
        return app

    def close(self) -> None:
        self._cache_pool.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self._token and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
                self._metrics.refused.labels("token").inc()
                log.warning("peer_request_refused", reason="token", remote=request.remote, path=request.path)
                return web.Response(status=401, text="cluster token required")
        return await handler(request)

    async def _read_body(self, request: web.Request) -> bytes:
        """The request body, within the header timeout (a client dripping its body is closed)."""
        async with asyncio.timeout(self._config.header_timeout_s):
            return await request.read()

    # ---- /v1/chunks ---------------------------------------------------------------------------

    def _parse_batch(self, body: bytes) -> list[ChunkRef]:
        try:
            items = msgpack.unpackb(body, raw=False)
        except (ValueError, msgpack.UnpackException, TypeError):
            raise FormatError("a batch is msgpack") from None
        if not isinstance(items, list) or not 0 < len(items) <= MAX_BATCH or not all(isinstance(i, bytes) for i in items):
            raise FormatError(f"a batch is a list of 1 to {MAX_BATCH} packed chunk requests")
        return [ChunkRef.unpack(item) for item in items]

    @asynccontextmanager
    async def _held(self, budget: ByteBudget, n: int) -> AsyncIterator[None]:
        """`n` bytes counted against this connection's budget and the server's."""
        await budget.acquire(n)
        try:
            await self._total.acquire(n)
        except BaseException:
            budget.release(n)
            raise
        try:
            yield
        finally:
            self._total.release(n)
            budget.release(n)

    async def _chunks(self, request: web.Request) -> web.StreamResponse:
        """msgpack list of packed chunk requests → a stream of msgpack items [index, tier, frame],
        one per distinct digest (index: its first position in the request; tier "" and an empty frame
        when this node could not obtain it)."""
        try:
            refs = self._parse_batch(await self._read_body(request))
        except TimeoutError:
            self._metrics.refused.labels("slow_body").inc()
            return web.Response(status=408, text="request body too slow")
        except FormatError as exc:
            self._metrics.refused.labels("malformed").inc()
            return web.Response(status=400, text=str(exc))
        first: dict[str, int] = {}
        for index, ref in enumerate(refs):
            first.setdefault(ref.digest, index)
        if len(first) < len(refs):
            self._metrics.refused.labels("duplicate").inc(len(refs) - len(first))
        wanted = [(index, refs[index]) for index in first.values()]

        response = web.StreamResponse(headers={"Content-Type": CHUNKS_CONTENT_TYPE, PROTOCOL_HEADER: PROTOCOL_VERSION})
        response.enable_chunked_encoding()
        await response.prepare(request)
        budget = ByteBudget(self._config.serve_connection_bytes)
        write_lock = asyncio.Lock()

        async def emit_many(items: list[tuple[int, str, bytes | FrameFile]]) -> None:
            """Items written in one piece: one chunked-encoding frame and one socket write for a group
            of small frames, not one per frame (the per-write cost is what bounded chunks/s); a frame
            in a file of its own goes from the file to the socket with sendfile."""
            async with write_lock:
                try:  # a client that stops reading must not hold its share of the byte budget for ever
                    async with asyncio.timeout(self._config.header_timeout_s):
                        await _write_items(request, response, items)
                except TimeoutError:
                    self._metrics.refused.labels("slow_reader").inc()
                    if request.transport is not None:
                        request.transport.abort()
                    raise ConnectionResetError("the client stopped reading") from None
            served: dict[str, int] = {}
            for _, tier, _frame in items:
                if tier:
                    served[tier] = served.get(tier, 0) + 1
            for tier, count in served.items():
                self._metrics.served.labels(tier).inc(count)
            if served:
                self._metrics.served_bytes.inc(sum(len(frame) for _, tier, frame in items if tier))

        async def emit(index: int, tier: str, frame: bytes) -> None:
            await emit_many([(index, tier, frame)])

        async def heartbeat(misses: list[asyncio.Task[None]]) -> None:
            waiting = set(misses)
            while waiting:
                _, waiting = await asyncio.wait(waiting, timeout=HEARTBEAT_S)
                if waiting and not write_lock.locked():
                    await emit(*HEARTBEAT)

        abandoned = False
        misses: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as group:
                maybe = [(i, r) for i, r in wanted if self._cache.might_have(r.digest)]
                for index, ref in wanted:
                    if not self._cache.might_have(ref.digest):
                        misses.append(group.create_task(self._serve_miss(index, ref, budget, emit)))
                for part in _hit_groups(maybe):
                    size = sum(r.compressed_length for _, r in part)
                    async with self._held(budget, size):
                        loaded = await asyncio.get_running_loop().run_in_executor(
                            self._cache_pool, self._cache.load_frames, [r for _, r in part], self._config.serve_sendfile)
                        try:
                            hits: list[tuple[int, str, bytes | FrameFile]] = []
                            for (index, ref), hit in zip(part, loaded):
                                if hit is None:
                                    misses.append(group.create_task(self._serve_miss(index, ref, budget, emit)))
                                else:  # as stored: the asker verifies it
                                    hits.append((index, "cache", hit))
                            if hits:
                                await emit_many(hits)
                            del hits
                        finally:
                            for hit in loaded:
                                if isinstance(hit, FrameFile):
                                    hit.close()
                        del loaded
                if misses:
                    group.create_task(heartbeat(misses))
        except* ConnectionError:  # the asker went away (or died) mid-answer: nothing more to do for it
            abandoned = True
        if abandoned:
            log.debug("peer_answer_abandoned", remote=request.remote)
            return response
        try:
            await response.write_eof()
        except ConnectionError:
            pass
        return response

    async def _serve_miss(self, index: int, ref: ChunkRef, budget: ByteBudget,
                          emit: Callable[[int, str, bytes], Awaitable[None]]) -> None:
        if not self._policy.allows_repository(ref.repository):
            self._metrics.refused.labels("origin").inc()
            log.info("peer_origin_refused", digest=ref.digest, repository=ref.repository[:200])
            await emit(index, "", b"")
            return
        frame, tier = b"", ""
        try:
            async with asyncio.timeout(self._config.serve_origin_timeout_s), self._origin_slots:
                frame, tier = await self._fetcher.fetch_frame(ref, use_peers=False)
        except TimeoutError:
            self._metrics.refused.labels("origin_timeout").inc()
            log.warning("peer_serve_failed", digest=ref.digest, error="origin deadline passed")
        except Exception as exc:  # whatever went wrong at the origin, this chunk is "unavailable" to the asker
            log.warning("peer_serve_failed", digest=ref.digest, error=f"{type(exc).__name__}: {exc}")
        async with self._held(budget, len(frame)):
            await emit(index, tier, frame)

    # ---- the rest -----------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"node_id": self._node_id, "protocol": PROTOCOL_VERSION,
                                  "summary": self._cache.holdings.generation})

    async def _summary(self, request: web.Request) -> web.Response:
        """This node's holdings filter (peer/summary.py); peers fetch it when `summary` in health changes."""
        return web.Response(body=self._cache.holdings.to_bytes(), content_type="application/octet-stream")

    async def _metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), content_type="text/plain", charset="utf-8")

    async def _status_endpoint(self, request: web.Request) -> web.Response:
        """This node for a person (`peerpull status`): cache, tiers, members, images, recent events."""
        if self._status is None:
            return web.Response(status=404, text="this node keeps no status")
        return web.json_response(await self._status())

    async def _profile_endpoint(self, request: web.Request) -> web.Response:
        """An image's startup profile by manifest digest, as this node keeps it (a hint: the asker
        checks it); 404 when it has none."""
        digest = request.match_info["digest"]
        if not is_digest(digest):
            self._metrics.refused.labels("malformed").inc()
            return web.Response(status=400, text="expected /v1/profiles/sha256:<hex>")
        data = await self._profiles(digest) if self._profiles is not None else None
        if data is None or len(data) > MAX_PROFILE_ANSWER:
            return web.Response(status=404, text="no startup profile for that manifest")
        return web.Response(body=data, content_type="application/vnd.peerpull.startup-profile.v1+json")

    async def _warm_endpoint(self, request: web.Request) -> web.StreamResponse:
        """`{"image": REF}` → NDJSON: a progress line every `warm_progress_s`, then one final line
        (`{"event": "done", "report": …}` or `{"event": "error", "error": …, "error_type": …}`), so a
        client can tell a slow warm-up from a hung node."""
        if self._warm is None:
            return web.Response(status=404)
        try:
            image = json.loads(await self._read_body(request))["image"]
            if not isinstance(image, str):
                raise TypeError
            registry = ImageReference.parse(image).registry
        except TimeoutError:
            return web.Response(status=408, text="request body too slow")
        except (ValueError, KeyError, TypeError, PeerpullError):
            return web.Response(status=400, text='expected {"image": "<registry>/<repository>:<tag>"}')
        if not self._policy.allows(registry):
            if not _is_loopback(request.remote):
                self._metrics.refused.labels("origin").inc()
                log.warning("peer_request_refused", reason="origin", remote=request.remote, registry=registry)
                return web.Response(status=403, text=(
                    f"node {self._node_id} does not trust registry {registry}: add it to peer.trusted_registries "
                    f"(PEERPULL_PEER_TRUSTED_REGISTRIES) or warm from the node itself"))
            self._policy.learn(registry)  # asked on loopback: by this node's own operator
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        progress = WarmProgress()
        task = asyncio.ensure_future(self._warm(image, progress))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self._config.warm_progress_s)
                if done:
                    break
                await response.write(json.dumps({"event": "progress", **progress.as_dict()}).encode() + b"\n")
            try:
                line: dict[str, object] = {"event": "done", "report": task.result()}
            except Exception as exc:  # reported to the client, which prints it as its one error line
                line = _error_line(exc)
            await response.write(json.dumps(line).encode() + b"\n")
            await response.write_eof()
        except ConnectionError:
            log.info("warm_abandoned", image=image, remote=request.remote)
        finally:
            if not task.done():
                task.cancel()  # nobody is waiting for it any more
                await asyncio.gather(task, return_exceptions=True)
        return response
