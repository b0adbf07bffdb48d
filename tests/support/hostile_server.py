"""A hostile HTTP server on loopback for fault injection (registries and peers as an attacker runs them).

It runs its own event loop in a thread, so synchronous tests (that start `peerpull` processes)
and async tests alike can point at it. Requests whose path contains a rule's pattern get that
rule's misbehaviour; all others are forwarded to `upstream` (a real registry or peer) unchanged,
so a test can break exactly one step (the manifest, a blob's tail, a chunk batch).

Modes:
  silent        accept the request, never answer (the connection stays open)
  drip          a 200 with honest headers, then the body one byte every `interval` seconds
  drip_headers  the status line and headers one byte every `interval` seconds, never finished
  garbage       bytes that are not HTTP, then close (a TLS port, a wrong service)
  endless       a 200 whose chunked body never ends (as fast as the reader takes it)
  huge          a 200 (or HEAD answer) announcing an enormous Content-Length, then an endless body
  oversend      the upstream's honest answer (status and headers) with 64 KiB of junk appended to
                its body and counted in Content-Length: a 206 that sends more than the range asked
Every connection is bounded by the test that uses it: stop() closes them all.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import aiohttp

MODES = ("silent", "drip", "drip_headers", "garbage", "endless", "huge", "oversend")
OVERSEND_BYTES = 64 << 10
HUGE_LENGTH = 1 << 40
_MAX_HEADER_BYTES = 64 << 10


@dataclass
class Rule:
    pattern: str
    mode: str
    interval: float = 5.0
    content_type: str = "application/json"
    length: int = 1_000_000  # the Content-Length a drip announces
    header: str = ""  # only requests carrying this header (e.g. "range"); empty: all
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (drip, endless, huge)

    def extra(self) -> str:
        return "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


class HostileServer:
    def __init__(self, upstream: str = "", host: str = "127.0.0.1") -> None:
        self.upstream = upstream.rstrip("/")  # e.g. http://127.0.0.1:5000; empty: unmatched paths get 404
        self.host = host
        self.port = 0
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._session: aiohttp.ClientSession | None = None
        self._started = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def add(self, pattern: str, mode: str, interval: float = 5.0, content_type: str = "application/json",
            length: int = 1_000_000, header: str = "", headers: dict[str, str] | None = None) -> None:
        """Misbehave with `mode` on every request whose path contains `pattern` ("" matches all);
        `length` is the Content-Length a drip announces (e.g. a blob's true size); with `header`,
        only requests carrying that request header (e.g. only the Range reads of a blob); `headers`
        are added to the answer's headers (e.g. a protocol version the client checks)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode}")
        self.rules.append(Rule(pattern, mode, interval, content_type, length, header.lower(), dict(headers or {})))

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> HostileServer:
        self._thread = threading.Thread(target=self._run, name="hostile-server", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("hostile server did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self._serve())
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self._close())
        loop.close()

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        if self._session is not None:
            await self._session.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- requests --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_HEADER_BYTES:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = (lines[0].split(" ") + ["", ""])[:3]
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
            self.seen.append(Seen(method, path, headers))
            rule = next((r for r in self.rules if r.pattern in path and (not r.header or r.header in headers)), None)
            if rule is None or rule.mode == "oversend":
                await self._forward(writer, method, path, headers, body, extra=OVERSEND_BYTES if rule else 0)
            else:
                await self._misbehave(writer, rule, method)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly, so asyncio's stream callback logs nothing
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _misbehave(self, writer: asyncio.StreamWriter, rule: Rule, method: str) -> None:
        if rule.mode == "silent":
            await asyncio.Event().wait()
        if rule.mode == "garbage":
            writer.write(b"\x15\x03\x01\x00\x02\x02\x50" + b"this is not http\r\n\xff\xfe" * 8)
            await writer.drain()
            return
        if rule.mode == "drip_headers":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"x" * 10_000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(rule.interval)
            return
        if rule.mode == "drip":
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {rule.content_type}\r\n{rule.extra()}"
                         f"Content-Length: {rule.length}\r\n\r\n".encode())
            await writer.drain()
            while True:
                await asyncio.sleep(rule.interval)
                writer.write(b" ")
                await writer.drain()
        if rule.mode == "endless":
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {rule.content_type}\r\n{rule.extra()}"
                         "Transfer-Encoding: chunked\r\n"
                         "Docker-Content-Digest: sha256:" .encode() + b"0" * 64 + b"\r\n\r\n")
            piece = b"[" * 65536
            frame = b"%x\r\n" % len(piece) + piece + b"\r\n"
            while True:
                writer.write(frame)
                await writer.drain()
        if rule.mode == "huge":
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {rule.content_type}\r\n{rule.extra()}"
                         f"Content-Length: {HUGE_LENGTH}\r\n"
                         "Accept-Ranges: bytes\r\n\r\n".encode())
            await writer.drain()
            if method == "HEAD":
                await asyncio.Event().wait()
            piece = b"\0" * 65536
            while True:
                writer.write(piece)
                await writer.drain()

    async def _forward(self, writer: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str],
                       body: bytes, extra: int = 0) -> None:
        if not self.upstream:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return
        assert self._session is not None
        out = {k: v for k, v in headers.items() if k not in ("host", "content-length", "connection")}
        async with self._session.request(method, self.upstream + path, headers=out, data=body or None,
                                         allow_redirects=False) as resp:
            payload = await resp.read()
            if extra and method != "HEAD":
                payload += b"\xee" * extra
            lines = [f"HTTP/1.1 {resp.status} {resp.reason or ''}"]
            for name, value in resp.headers.items():
                if name.lower() in ("content-length", "transfer-encoding", "connection"):
                    continue
                if name.lower() == "location":
                    value = value.replace(self.upstream, f"http://{self.address}")
                lines.append(f"{name}: {value}")
            length = resp.headers.get("Content-Length", "0") if method == "HEAD" else str(len(payload))
            lines += [f"Content-Length: {length}", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1") + (b"" if method == "HEAD" else payload))
            await writer.drain()
