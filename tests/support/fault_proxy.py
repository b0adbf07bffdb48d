"""A reverse proxy in front of a real registry that injects faults on demand (the only fake we use).

Faults are queued per request-path pattern: `proxy.fail("/blobs/", status=500, times=1)` or
`proxy.cut("/blobs/sha256:…", after=1000)` (send that many body bytes, then drop the connection),
or `proxy.corrupt("/blobs/…")` (flip a byte of the body). Every request is recorded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tests.support.aio_site import serve_local


@dataclass
class _Fault:
    pattern: str
    kind: str  # "status", "cut", "corrupt", "hold"
    times: int
    status: int = 500
    after: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: list[tuple[str, str, str]] = []  # (method, path with query, Range header)
        self._faults: list[_Fault] = []
        self.served_statuses: list[int] = []  # statuses of injected error answers
        self.held = 0
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.address = ""

    def fail(self, pattern: str, status: int = 500, times: int = 1, headers: dict[str, str] | None = None) -> None:
        self._faults.append(_Fault(pattern, "status", times, status=status, headers=headers or {}))

    def cut(self, pattern: str, after: int, times: int = 1) -> None:
        self._faults.append(_Fault(pattern, "cut", times, after=after))

    def hold(self, pattern: str, times: int = 1) -> None:
        """Never answer (until the proxy stops): the client's own read timeout must end the wait."""
        self._faults.append(_Fault(pattern, "hold", times))

    def corrupt(self, pattern: str, times: int = 1) -> None:
        self._faults.append(_Fault(pattern, "corrupt", times))

    def _take(self, path: str, method: str) -> _Fault | None:
        for fault in self._faults:
            if fault.times > 0 and fault.pattern in path and method in ("GET", "HEAD", "POST", "PUT", "PATCH"):
                fault.times -= 1
                return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path_qs
        self.requests.append((request.method, path, request.headers.get("Range", "")))
        fault = self._take(path, request.method)
        if fault is not None and fault.kind == "status":
            self.served_statuses.append(fault.status)
            return web.Response(status=fault.status, headers=fault.headers, text="injected fault")
        if fault is not None and fault.kind == "hold":
            self.held += 1
            await self._released.wait()
            return web.Response(status=503, text="released at shutdown")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read()
        async with self._session.request(request.method, self.upstream + path, headers=headers, data=body or None,
                                         allow_redirects=False) as upstream:
            payload = await upstream.read()
            out_headers = {k: v for k, v in upstream.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding", "connection")}
            if "Location" in out_headers:
                out_headers["Location"] = out_headers["Location"].replace(self.upstream, f"http://{self.address}")
            if fault is not None and fault.kind == "corrupt" and payload:
                payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            if fault is not None and fault.kind == "cut":
                response.content_length = len(payload)
                await response.prepare(request)
                await response.write(payload[: fault.after])
                assert request.transport is not None
                request.transport.close()
                return response
            # a HEAD answer has no body but announces the blob's length
            response.content_length = int(upstream.headers.get("Content-Length", 0)) if request.method == "HEAD" else len(payload)
            await response.prepare(request)
            if request.method != "HEAD":
                await response.write(payload)
            await response.write_eof()
            return response

    async def start(self) -> FaultProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.address = await serve_local(app)
        return self

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
