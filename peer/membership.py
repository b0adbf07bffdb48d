"""Who is alive: candidates come from discovery, liveness from our own health checks.

mDNS and DNS cannot tell that a node died (stale records live on), so a member is alive only
while it answers `/v1/health`; the hash ring is built over the live members and this node.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from peer.client import PeerClient, PeerFetchError
from peer.ring import ranked

log = structlog.get_logger(__name__)


@dataclass
class Member:
    node_id: str
    address: str
    last_ok: float
    skip_until: float = 0.0


class Membership:
    def __init__(self, node_id: str, client: PeerClient, health_interval_s: float, failure_skip_s: float) -> None:
        self.node_id = node_id
        self._client = client
        self._interval = health_interval_s
        self._skip_s = failure_skip_s
        self._members: dict[str, Member] = {}  # node_id → member
        self._candidates: set[str] = set()
        self._was_alone = True

    def set_candidates(self, addresses: set[str]) -> None:
        self._candidates = set(addresses)

    def alive(self) -> list[Member]:
        horizon = time.monotonic() - 3 * self._interval
        return [m for m in self._members.values() if m.last_ok >= horizon]

    def ring_members(self) -> list[str]:
        return [self.node_id, *(m.node_id for m in self.alive())]

    def candidates_for(self, digest: str) -> list[Member]:
        """Peers to ask for `digest`, owner first; empty when this node is the owner."""
        alive = {m.node_id: m for m in self.alive()}
        order = ranked(digest, [self.node_id, *alive])
        now = time.monotonic()
        out = []
        for node_id in order:
            if node_id == self.node_id:
                break  # we rank above the rest: we are the one who goes to the origin
            member = alive[node_id]
            if member.skip_until <= now:
                out.append(member)
        return out[:2]

    def failed(self, member: Member, reason: str) -> None:
        member.skip_until = time.monotonic() + self._skip_s
        log.warning("peer_skipped", peer=member.node_id, address=member.address, reason=reason,
                    seconds=self._skip_s)

    async def check_once(self) -> None:
        addresses = set(self._candidates)
        results = await asyncio.gather(*(self._client.health(a) for a in addresses), return_exceptions=True)
        now = time.monotonic()
        for address, result in zip(addresses, results):
            if isinstance(result, PeerFetchError) or not isinstance(result, dict):
                continue
            node_id = result["node_id"]
            if node_id == self.node_id:
                continue  # ourselves, found through discovery
            member = self._members.get(node_id)
            if member is None:
                log.info("peer_joined", peer=node_id, address=address)
                self._members[node_id] = Member(node_id, address, now)
            else:
                member.address, member.last_ok = address, now
        for node_id, member in list(self._members.items()):
            if member.last_ok < now - 3 * self._interval:
                log.info("peer_left", peer=node_id, address=member.address)
                del self._members[node_id]
        alone = not self._members
        if alone and not self._was_alone:
            log.warning("member_list_shrunk_to_self", node=self.node_id)
        self._was_alone = alone

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval)
