"""Static and DNS discovery feed the member list (zeroconf: see test_zeroconf_discovery)."""

from __future__ import annotations

import asyncio

from peer.config import PeerConfig
from peer.discovery import DnsDiscovery, StaticDiscovery, make_discovery
from tests.support.waiting import async_wait_until


async def test_dns_discovery_resolves_every_address_of_the_name() -> None:
    found: list[set[str]] = []
    task = asyncio.ensure_future(DnsDiscovery("localhost", 7470, interval_s=0.05).run(found.append))
    await async_wait_until(lambda: bool(found), 30, "a DNS answer")
    task.cancel()
    assert found and "127.0.0.1:7470" in found[-1]


async def test_static_discovery_and_the_factory() -> None:
    found: list[set[str]] = []
    await StaticDiscovery(("10.0.0.2:7470", "10.0.0.3:7470")).run(found.append)
    assert found == [{"10.0.0.2:7470", "10.0.0.3:7470"}]
    assert make_discovery(PeerConfig(discovery="none"), "n", "127.0.0.1") is None
    assert isinstance(make_discovery(PeerConfig(discovery="dns", dns_name="x"), "n", "127.0.0.1"), DnsDiscovery)
