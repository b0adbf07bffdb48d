"""Which peer to ask for a chunk, and when to ask a second one: load-aware, hedged, quick to give up.

The candidates come from the membership (holders, then the chunk's ancestors in its fan-out
tree). Among holders, which are equally good, the one this node has the fewest requests in
flight to goes first. A source that fails (refused, timed out, bad bytes) is skipped for
`failure_skip_s` and the next candidate is asked at once; a skipped member also leaves the chunk
trees (peer/membership.py), so its children re-attach to the next member in rank.

Hedging is relative. In a cold start every answer waits for the bytes queued ahead of it (a
stream keeps 32 MiB in flight), so an absolute deadline would hedge half the requests of a healthy
cluster and double the load on grandparents. A waiting fetch looks at its sources every *tick*
(the recent answer time, at least `hedge_after_s`). A source is *suspect* when it has been skipped
since it was asked, when its own answers take SLOW_FACTOR times what all sources take here, or
when it delivers RATE_FACTOR (5) times fewer bytes per busy second than they do (under
saturation, answer times differ little and rates a lot). A suspect source is hedged at the first tick (the
next source is asked too, the first answer wins, the other request is cancelled), a healthy one
only after HEDGE_FACTOR ticks. A suspect source nobody can stand in for (a slow node ranked first
for a chunk) is skipped as slow after two ticks, so the tree re-forms without it; one that keeps
answering late or losing its hedges is skipped as slow after SLOW_STRIKES.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

from converter.format.errors import FormatError
from peer.chunk import ChunkRef
from peer.client import PeerFetchError
from peer.membership import Member, Membership

log = structlog.get_logger(__name__)
T = TypeVar("T")
HEDGE_FACTOR = 4.0  # a healthy source is hedged after this many ticks (the recent answer time)
SLOW_FACTOR = 3.0  # a source whose answers take this many times the others' is suspect
EWMA_WEIGHT = 0.1
# a source delivering this many times fewer bytes per busy second than the sources here is suspect (9
# before: with the real torch feed one slow peer in 100 went unsuspected and p99 rose to 2.0× one node)
RATE_FACTOR = 5.0
SLOW_STRIKES = 3  # late answers or lost hedges of a suspect source before it is skipped as slow

Attempt = Callable[[Member, ChunkRef], Awaitable[T]]


class SourceExhausted(Exception):
    """No peer delivered: the caller goes to the origin."""


class PeerSources(Generic[T]):
    """`fetch(ref, members, attempt)`: the first good answer of `attempt(member, ref)` among `members`."""

    def __init__(self, membership: Membership, hedge_after_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_failure: Callable[[Member, ChunkRef, str, Exception], None] | None = None) -> None:
        self._membership = membership
        self._floor = hedge_after_s
        self._clock = clock
        self._on_failure = on_failure
        self._outstanding: dict[str, int] = {}  # node_id → requests this node has in flight to it
        self._strikes: dict[str, int] = {}
        self._answer_s = 0.0  # moving average of answer times, every source
        self._answers = 0
        self._member_s: dict[str, float] = {}  # the same per source
        # per source: bytes it answered and the time requests to it were outstanding (its rate to us)
        self._delivered: dict[str, int] = {}
        self._busy_s: dict[str, float] = {}
        self._busy_since: dict[str, float] = {}
        self.hedges = 0  # second requests sent (a counter for benchmarks and metrics)

    def hedge_after(self) -> float:
        """How late an answer is late: HEDGE_FACTOR ticks."""
        return HEDGE_FACTOR * self.tick()

    def tick(self) -> float:
        """How often a waiting fetch looks again at its sources: the recent answer time, at least
        `hedge_after_s`. A suspect source is hedged at the first tick, a healthy one after HEDGE_FACTOR."""
        return max(self._floor, self._answer_s)

    def outstanding(self, node_id: str) -> int:
        return self._outstanding.get(node_id, 0)

    def suspect(self, member: Member) -> bool:
        """Skipped since, answering SLOW_FACTOR times slower than the sources here on average, or
        delivering RATE_FACTOR times fewer bytes per busy second than they do (under a saturated
        cold start answer times differ little, rates a lot)."""
        now = self._clock()
        if member.skip_until > now:
            return True
        own = self._member_s.get(member.node_id)
        if own is not None and own > max(self._floor, SLOW_FACTOR * self._answer_s):
            return True
        busy = self._busy(member.node_id, now)
        if busy < 2 * self.tick():  # a few answers' worth of evidence first
            return False
        total_busy = sum(self._busy(n, now) for n in self._busy_s.keys() | self._busy_since.keys())
        overall = sum(self._delivered.values()) / total_busy if total_busy else 0.0
        return self._delivered.get(member.node_id, 0) / busy < overall / RATE_FACTOR

    def _busy(self, node_id: str, now: float) -> float:
        since = self._busy_since.get(node_id)
        return self._busy_s.get(node_id, 0.0) + (now - since if since is not None else 0.0)

    def order(self, digest: str, members: list[Member]) -> list[Member]:
        """Holders of `digest` least loaded first (a stable sort), ancestors after them in tree order."""
        holders = [m for m in members if m.holds is not None and m.holds.might_hold(digest)]
        rest = [m for m in members if not (m.holds is not None and m.holds.might_hold(digest))]
        return [*sorted(holders, key=lambda m: self.outstanding(m.node_id)), *rest]

    async def fetch(self, ref: ChunkRef, members: list[Member], attempt: Attempt[T],
                    more: Callable[[], list[Member]] | None = None) -> tuple[T, Member]:
        """The answer and the member that gave it; SourceExhausted when every member failed, or when
        every member still asked has been skipped since (dead or slow: the caller goes on without
        it). `more()` gives the candidates as they are now, asked when every source asked failed or
        the deadline passes with nobody left to hedge to (a skipped parent's place in the tree goes
        to the next member in rank)."""
        queue = self.order(ref.digest, members)
        asked: set[str] = set()
        running: dict[asyncio.Task[T], Member] = {}  # in the order they were asked
        waited = 0  # deadlines passed without an answer
        try:
            while queue or running:
                if not running:
                    self._start(queue.pop(0), ref, attempt, running, asked)
                done, _ = await asyncio.wait(running, timeout=self.tick(), return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    waited += 1
                    suspect = all(self.suspect(m) for m in running.values())
                    if not suspect and waited < HEDGE_FACTOR:
                        continue  # a healthy source is busy: hedging would only add load
                    if not queue and more is not None:
                        queue = [m for m in self.order(ref.digest, more()) if m.node_id not in asked]
                    if not queue and suspect and waited >= 2 and more is not None:
                        # suspect, and nobody can stand in: skip them as slow, so the tree re-forms
                        # without them (the next member in rank, or the origin at the top)
                        for member in running.values():
                            if member.skip_until <= self._clock():
                                self._membership.failed(member, "slow")
                        queue = [m for m in self.order(ref.digest, more()) if m.node_id not in asked]
                    if queue:
                        self.hedges += 1
                        self._start(queue.pop(0), ref, attempt, running, asked)
                    elif all(m.skip_until > self._clock() for m in running.values()):
                        break  # everyone still asked is skipped now: waiting on would wait for its timeout
                    continue
                for task in done:
                    asked_before = list(running.values())[:list(running).index(task)]
                    member = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        for loser in asked_before:  # asked first and overtaken by the hedge
                            self._strike(loser)
                        return task.result(), member
                    self._failed(member, ref, exc)
                if not queue and not running and more is not None:  # the tree without the failed ones
                    queue = [m for m in self.order(ref.digest, more()) if m.node_id not in asked]
            raise SourceExhausted(ref.digest)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    def _start(self, member: Member, ref: ChunkRef, attempt: Attempt[T], running: dict[asyncio.Task[T], Member],
               asked: set[str]) -> None:
        asked.add(member.node_id)
        if not self.outstanding(member.node_id):
            self._busy_since[member.node_id] = self._clock()
        self._outstanding[member.node_id] = self.outstanding(member.node_id) + 1
        running[asyncio.ensure_future(self._timed(member, ref, attempt))] = member

    async def _timed(self, member: Member, ref: ChunkRef, attempt: Attempt[T]) -> T:
        started = self._clock()
        try:
            result = await attempt(member, ref)
        finally:
            self._outstanding[member.node_id] -= 1
            if not self._outstanding[member.node_id]:
                del self._outstanding[member.node_id]
                since = self._busy_since.pop(member.node_id, self._clock())
                self._busy_s[member.node_id] = self._busy_s.get(member.node_id, 0.0) + self._clock() - since
        self._delivered[member.node_id] = self._delivered.get(member.node_id, 0) + ref.compressed_length
        took = self._clock() - started
        own = self._member_s.get(member.node_id, took)
        self._member_s[member.node_id] = own + 2 * EWMA_WEIGHT * (took - own)  # quicker: one source's few answers
        self._answer_s = took if not self._answers else self._answer_s + EWMA_WEIGHT * (took - self._answer_s)
        self._answers += 1
        if took > self.hedge_after() and self.suspect(member):
            self._strike(member)
        else:  # in a row: one timely answer clears them
            self._strikes.pop(member.node_id, None)
        return result

    def _strike(self, member: Member) -> None:
        strikes = self._strikes[member.node_id] = self._strikes.get(member.node_id, 0) + 1
        if strikes >= SLOW_STRIKES:
            self._strikes.pop(member.node_id, None)
            self._membership.failed(member, "slow")

    def _failed(self, member: Member, ref: ChunkRef, exc: BaseException) -> None:
        if not isinstance(exc, (PeerFetchError, FormatError)):
            raise exc
        reason = exc.reason if isinstance(exc, PeerFetchError) else "bad_bytes"
        if self._on_failure is not None:
            self._on_failure(member, ref, reason, exc)
        self._membership.failed(member, reason)
