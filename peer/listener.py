"""The peer server's listening socket: a header timeout and a connection cap around aiohttp.

aiohttp's server bounds neither how long a connection may take to send a request nor how many
connections are open, so a client that opens thousands of sockets and sends half a request line
holds them (and file descriptors) for as long as it likes. Here every connection has a timer: it
must start a request within `header_timeout_s` of connecting or of its previous request ending,
or it is closed. At `max_connections`, the oldest connection that is not inside a request is
closed to make room (a flood of idle sockets cannot lock a well-behaved peer out); when every
connection is busy, the new one is refused.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from converter.format.errors import ConfigError

log = structlog.get_logger(__name__)


class _Guarded(asyncio.Protocol):
    """Delegates to aiohttp's protocol; adds the per-connection timer."""

    def __init__(self, listener: GuardedListener, inner: Any) -> None:
        self._listener = listener
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.busy = 0
        self._timer: asyncio.TimerHandle | None = None

    # -- the timer ----------------------------------------------------------------------------
    def arm(self) -> None:
        self.disarm()
        self._timer = asyncio.get_running_loop().call_later(self._listener.header_timeout_s, self._expired)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.busy == 0 and self.transport is not None:
            self._listener.expired += 1
            self.transport.abort()

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)
        self._listener.opened(self)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return bool(self.inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self._listener.closed(self)
        self.transport = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedListener:
    def __init__(self, header_timeout_s: float, max_connections: int,
                 on_evicted: Callable[[], None] = lambda: None) -> None:
        self.header_timeout_s = header_timeout_s
        self._max = max_connections
        self._on_evicted = on_evicted
        self._open: dict[asyncio.BaseTransport, _Guarded] = {}  # in order of connection: oldest first
        self._server: asyncio.Server | None = None
        self.expired = 0  # closed for not sending a request in time
        self.port = 0

    @property
    def connections(self) -> int:
        return len(self._open)

    def opened(self, guard: _Guarded) -> None:
        assert guard.transport is not None
        if len(self._open) >= self._max:
            victim = next((g for g in self._open.values() if g.busy == 0), None)
            self._on_evicted()
            if victim is None:  # every connection is inside a request: refuse the newcomer
                guard.transport.abort()
                return
            assert victim.transport is not None
            victim.transport.abort()
            self._open.pop(victim.transport, None)
        self._open[guard.transport] = guard
        guard.arm()

    def closed(self, guard: _Guarded) -> None:
        if guard.transport is not None:
            self._open.pop(guard.transport, None)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        guard = self._open.get(request.transport) if request.transport is not None else None
        if guard is not None:
            guard.busy += 1
            guard.disarm()
        try:
            return await handler(request)
        finally:
            if guard is not None:
                guard.busy -= 1
                if guard.busy == 0 and guard.transport is not None:
                    guard.arm()

    async def start(self, runner: web.AppRunner, host: str, port: int) -> None:
        """Listen for `runner` (set up, its app using `middleware`); the ordinary reasons this fails
        are a ConfigError naming the fix."""
        server = runner.server
        assert server is not None, "runner.setup() first"
        where = f"{host}:{port}"
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _Guarded(self, server()), host, port, reuse_address=True, backlog=1024)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot listen on {where}: {host!r} does not resolve ({exc.strerror}); "
                              "give an address of this host or 0.0.0.0 (--listen HOST:PORT, peer.listen_host)") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {where}: the port is already in use (another peerpull?); "
                                  "stop it or pick another port (--listen HOST:PORT, peer.listen_port)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"cannot listen on {where}: {host} is not an address of this host; "
                                  "give one of its addresses or 0.0.0.0 (--listen HOST:PORT, peer.listen_host)") from None
            if exc.errno == errno.EACCES:
                raise ConfigError(f"cannot listen on {where}: permission denied (ports below 1024 need root); "
                                  "pick another port (--listen HOST:PORT, peer.listen_port)") from None
            raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._open):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        self._open.clear()
