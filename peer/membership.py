"""Who is alive: candidates come from discovery, liveness from our own health checks.

mDNS and DNS cannot tell that a node died (stale records live on), so a member is alive only
while it answers `/v1/health`; the hash ring is built over the live members and this node.

A health answer also carries the generation of the member's holdings filter (peer/summary.py);
when it changes, the filter itself is fetched from `/v1/summary` (fixed size, so a hostile peer
can neither grow it nor send a malformed one). A chunk is asked first from members whose filter
says they hold it, even when this node owns it on the ring: a warm peer serves what it has, and
in a cold cluster (empty filters) the ring order is unchanged, so the origin still sees each
chunk about once.

Beyond the holders, a chunk is asked up its fan-out tree (peer/ring.py): the parent first, then
the parent's parent. `upstream_for` is what a fetch on another node's behalf may ask: only members
ranked above this node, so requests between nodes climb and never cycle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from peer.client import PeerClient, PeerFetchError
from peer.ring import Ring
from peer.summary import DigestFilter
from peer.tasks import TaskSet

log = structlog.get_logger(__name__)
MISSED_ROUNDS = 3  # health checks a member may miss in a row before it is gone
# a changed summary is fetched at most this often per member (10 health intervals, within 1-10 s):
# while a cluster warms, every filter changes all the time, and N nodes fetching N-1 filters of
# 128 KiB every interval would cost more than it saves
SUMMARY_EVERY = (10, 1.0, 10.0)
PEERS_ASKED = 2  # sources asked for one chunk before the origin (snapshotter/fs/request_timeout.py)
DEFAULT_FANOUT = 4


@dataclass(slots=True)  # slots: a node of a 1,000-node cluster holds 999 of them
class Member:
    node_id: str
    address: str
    last_ok: float
    round_ok: int = 0  # the last health-check round it answered in
    skip_until: float = 0.0
    holds: DigestFilter | None = None  # what it holds, as of `generation`
    generation: int = -1
    summary_at: float = float("-inf")  # when it was last fetched


class Membership:
    def __init__(self, node_id: str, client: PeerClient, health_interval_s: float, failure_skip_s: float,
                 fanout: int = DEFAULT_FANOUT, clock: Callable[[], float] = time.monotonic) -> None:
        self.node_id = node_id
        self.fanout = fanout
        self._clock = clock  # a seam: the simulation (bench/sim) runs many nodes on a virtual clock
        self._view: tuple[int, list[Member], Ring] | None = None  # (round, alive, ring): rebuilt on a change
        self._client = client
        self._interval = health_interval_s
        self._skip_s = failure_skip_s
        self._members: dict[str, Member] = {}  # node_id → member
        self._candidates: set[str] = set()
        self._was_alone = True
        # summaries are fetched beside the health checks, never in their way: a check that waited
        # for a busy peer's 128 KiB would make every member look dead
        self._summaries = TaskSet("membership")
        self._refreshing: set[str] = set()
        self._round = 0  # health-check rounds started
        factor, lo, hi = SUMMARY_EVERY
        self._summary_every = min(hi, max(lo, factor * health_interval_s))

    def set_candidates(self, addresses: set[str]) -> None:
        self._candidates = set(addresses)

    def known(self) -> tuple[list[Member], set[str]]:
        """Members (some may be missing rounds) and every candidate address (for `peerpull status`)."""
        return list(self._members.values()), set(self._candidates)

    def alive(self) -> list[Member]:
        """Members that missed fewer than three complete health-check rounds. Counted in rounds, not
        seconds: a round slowed by busy peers, or a late wake-up of a busy event loop, must not
        make every member look dead for a moment and send every chunk to the origin."""
        return self._current()[1]

    def _current(self) -> tuple[int, list[Member], Ring]:
        if self._view is None or self._view[0] != self._round:
            now = self._clock()
            alive = [m for m in self._members.values() if self._round - m.round_ok <= MISSED_ROUNDS]
            # a member being skipped is out of the chunk trees too: its children re-attach to the next
            # member in rank, so a dead or slow node costs one origin fetch per chunk it led, not one
            # per child (checked again every health round, when skips may have ended)
            self._view = (self._round, alive,
                          Ring.of([self.node_id, *(m.node_id for m in alive if m.skip_until <= now)]))
        return self._view

    def ring(self) -> Ring:
        return self._current()[2]

    def ring_members(self) -> list[str]:
        return [self.node_id, *(m.node_id for m in self.alive())]

    def upstream_for(self, digest: str) -> list[Member]:
        """Members to ask for `digest` on another node's behalf: this node's ancestors in the chunk's
        tree that are not being skipped, nearest first; empty at the top (it goes to the origin)."""
        now = self._clock()
        return [m for m in self._ancestors(digest) if m.skip_until <= now][:PEERS_ASKED]

    def _ancestors(self, digest: str) -> list[Member]:
        _, _, ring = self._current()
        return [self._members[n] for n in ring.ancestors(digest, self.node_id, self.fanout) if n in self._members]

    def candidates_for(self, digest: str) -> list[Member]:
        """Peers to ask for `digest`: those that hold it first, then its ancestors in the chunk's tree
        (the owner alone when `fanout` is 0); empty when no live peer holds it and this node ranks
        first (it goes to the origin)."""
        now = self._clock()
        _, alive, _ = self._current()
        holders = [m for m in alive if m.holds is not None and m.skip_until <= now and m.holds.might_hold(digest)]
        chosen = {m.node_id for m in holders}
        above = [m for m in self._ancestors(digest) if m.skip_until <= now and m.node_id not in chosen]
        return [*holders, *above][:PEERS_ASKED]

    def above(self, digest: str, member: Member) -> bool:
        """Whether `member` ranks above this node for `digest` (asking it can never come back here)."""
        ring = self.ring()
        return member.node_id in ring.members and ring.position(digest, member.node_id) < ring.position(digest, self.node_id)

    def failed(self, member: Member, reason: str) -> None:
        member.skip_until = self._clock() + self._skip_s
        self._view = None
        log.warning("peer_skipped", peer=member.node_id, address=member.address, reason=reason,
                    seconds=self._skip_s)

    async def check_once(self) -> None:
        addresses = set(self._candidates)
        self.begin_round()
        results = await asyncio.gather(*(self._client.health(a) for a in addresses), return_exceptions=True)
        for address, result in zip(addresses, results):
            if isinstance(result, PeerFetchError) or not isinstance(result, dict):
                continue
            self.heard(address, result)
        self.end_round()

    def heard(self, address: str, result: dict[str, object]) -> None:
        """A health answer of this round (the simulation calls it directly: no HTTP)."""
        now = self._clock()
        node_id = str(result["node_id"])  # the client checked it is a string
        if node_id == self.node_id:
            return  # ourselves, found through discovery
        member = self._members.get(node_id)
        if member is None:
            log.info("peer_joined", peer=node_id, address=address)
            member = self._members[node_id] = Member(node_id, address, now)
            self._view = None
        else:
            member.address, member.last_ok = address, now
        member.round_ok = self._round
        generation = result.get("summary")
        if (isinstance(generation, int) and not isinstance(generation, bool) and generation != member.generation
                and node_id not in self._refreshing and now - member.summary_at >= self._summary_every):
            self._refreshing.add(node_id)
            member.summary_at = now
            self._summaries.spawn(self._refresh_summary(member, generation), f"summary {node_id}")

    def begin_round(self) -> None:
        self._round += 1

    def end_round(self) -> None:
        """Members that missed too many rounds are gone."""
        for node_id, member in list(self._members.items()):
            if self._round - member.round_ok >= MISSED_ROUNDS:
                log.info("peer_left", peer=node_id, address=member.address)
                del self._members[node_id]
                self._view = None
        alone = not self._members
        if alone and not self._was_alone:
            log.warning("member_list_shrunk_to_self", node=self.node_id)
        self._was_alone = alone

    async def _refresh_summary(self, member: Member, generation: int) -> None:
        try:
            member.holds = DigestFilter(await self._client.summary(member.address))
        except PeerFetchError as exc:  # keep asking by the ring only; tried again at the next change
            member.holds = None
            log.info("peer_summary_failed", peer=member.node_id, reason=exc.reason)
        finally:
            self._refreshing.discard(member.node_id)
        member.generation = generation

    async def run(self) -> None:
        try:
            while True:
                await self.check_once()
                await asyncio.sleep(self._interval)
        finally:
            await self._summaries.close()
