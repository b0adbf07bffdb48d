"""Finding other nodes: zeroconf (mDNS), a static list, or DNS (e.g. a Kubernetes headless Service).

Discovery only proposes addresses; Membership decides who is alive by health checks, because
mDNS records and DNS answers outlive the nodes they name.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Protocol

import structlog
from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from converter.format.errors import ConfigError
from peer.client import PROTOCOL_VERSION
from peer.config import PeerConfig

log = structlog.get_logger(__name__)
SERVICE_TYPE = "_peerpull._tcp.local."
Update = Callable[[set[str]], None]


class Discovery(Protocol):
    async def run(self, update: Update) -> None: ...

    async def close(self) -> None: ...


class StaticDiscovery:
    def __init__(self, peers: tuple[str, ...]) -> None:
        self._peers = set(peers)

    async def run(self, update: Update) -> None:
        update(self._peers)

    async def close(self) -> None:
        pass


class DnsDiscovery:
    """Every address the name resolves to, re-resolved periodically (a headless Service lists pods)."""

    def __init__(self, name: str, port: int, interval_s: float) -> None:
        self._name, self._port, self._interval = name, port, interval_s

    async def run(self, update: Update) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = await loop.getaddrinfo(self._name, self._port, type=socket.SOCK_STREAM)
                update({f"{info[4][0]}:{self._port}" for info in infos})
            except OSError as exc:
                log.warning("dns_discovery_failed", name=self._name, error=str(exc))
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        pass


class ZeroconfDiscovery:
    """Announces this node as `<node id>._peerpull._tcp.local.` and browses for the others.

    Bound to the node's own address: on multi-homed hosts the default (all interfaces) misbehaves.
    TXT records stay small: node id, port, protocol version.
    """

    def __init__(self, node_id: str, address: str, port: int) -> None:
        self._node_id, self._address, self._port = node_id, address, port
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._found: dict[str, str] = {}  # service name → host:port
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, update: Update) -> None:
        self._zc = AsyncZeroconf(interfaces=[self._address])
        info = AsyncServiceInfo(
            SERVICE_TYPE, f"{self._node_id}.{SERVICE_TYPE}", addresses=[socket.inet_aton(self._address)],
            port=self._port, properties={"id": self._node_id, "port": str(self._port), "v": PROTOCOL_VERSION},
            server=f"{self._node_id}.local.",
        )
        await self._zc.async_register_service(info)
        log.info("zeroconf_registered", node=self._node_id, address=self._address, port=self._port)

        def changed(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            if state_change is ServiceStateChange.Removed:
                self._found.pop(name, None)
                update(set(self._found.values()))
                return
            task = asyncio.ensure_future(self._resolve(name, update))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE], handlers=[changed])
        await asyncio.Event().wait()  # runs until cancelled

    async def _resolve(self, name: str, update: Update) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        addresses = info.parsed_addresses()
        if addresses and info.port:
            self._found[name] = f"{addresses[0]}:{info.port}"
            update(set(self._found.values()))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_unregister_all_services()
            await self._zc.async_close()


def make_discovery(config: PeerConfig, node_id: str, advertise: str) -> Discovery | None:
    if config.discovery == "none":
        return None
    if config.discovery == "static":
        return StaticDiscovery(config.static_peers)
    if config.discovery == "dns":
        if not config.dns_name:
            raise ConfigError("peer.discovery = dns needs peer.dns_name")
        return DnsDiscovery(config.dns_name, config.dns_port, config.discovery_interval_s)
    if config.discovery == "zeroconf":
        return ZeroconfDiscovery(node_id, advertise, config.listen_port)
    raise ConfigError(f"peer.discovery must be zeroconf, static, dns or none (got {config.discovery!r})")
