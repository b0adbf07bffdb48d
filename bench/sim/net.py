"""Simulated links: each node has an uplink and a downlink of its own bandwidth, plus one latency.

A transfer of `n` bytes from A to B queues on A's uplink and on B's downlink (first come, first
served on each, both at once) and ends when both have carried it, one latency later. This is a
store-and-forward fluid model: no TCP slow start, no loss, no fair sharing within a link, no
switch limits (the bridge is non-blocking); what it keeps is what decides a cold start: a node
cannot send more than its uplink, receive more than its downlink, and the registry not more than
its egress cap.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

REGISTRY = "registry"


@dataclass
class Link:
    up_bps: float  # bytes per second
    down_bps: float
    up_free: float = 0.0  # when the uplink has sent everything queued on it
    down_free: float = 0.0
    uploaded: int = 0
    downloaded: int = 0


@dataclass
class Net:
    latency_s: float  # one way, between any two nodes
    links: dict[str, Link] = field(default_factory=dict)

    def add(self, name: str, up_bps: float, down_bps: float) -> Link:
        link = self.links[name] = Link(up_bps, down_bps)
        return link

    async def transfer(self, src: str, dst: str, nbytes: int) -> None:
        """Carry `nbytes` from `src` to `dst`; returns when the last byte has arrived. Cancelled
        (the asker gave up: the real client closes the connection), the bytes not yet sent are
        handed back to both links, so a hedged request does not leave a phantom queue behind."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        up, down = self.links[src], self.links[dst]
        up_start = max(now, up.up_free)
        down_start = max(now, down.down_free)
        up.up_free = up_start + nbytes / up.up_bps
        down.down_free = down_start + nbytes / down.down_bps
        up.uploaded += nbytes
        down.downloaded += nbytes
        up_end, down_end = up.up_free, down.down_free
        try:
            await asyncio.sleep(max(up_end, down_end) + self.latency_s - now)
        except asyncio.CancelledError:
            now = loop.time()
            unsent_up = max(0.0, up_end - max(now, up_start))
            unsent_down = max(0.0, down_end - max(now, down_start))
            up.up_free = max(now, up.up_free - unsent_up)
            down.down_free = max(now, down.down_free - unsent_down)
            up.uploaded -= int(unsent_up * up.up_bps)
            down.downloaded -= int(unsent_down * down.down_bps)
            raise

    async def hop(self) -> None:
        """A small message (a request) crossing the network."""
        await asyncio.sleep(self.latency_s)
