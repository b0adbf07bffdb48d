"""Serve an aiohttp app on 127.0.0.1 and a free port (test servers: fault proxy, token server)."""

from __future__ import annotations

from aiohttp import web


async def serve_local(app: web.Application) -> tuple[web.AppRunner, str]:
    """Start `app`; returns the runner (call `cleanup()` to stop) and "127.0.0.1:PORT"."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"127.0.0.1:{port}"
