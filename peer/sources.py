"""Which peer to ask for a chunk, and when to ask a second one: load-aware, hedged, quick to give up.

The candidates come from the membership (holders, then the chunk's ancestors in its fan-out
tree). Among holders, which are equally good, the one this node has the fewest requests in
flight to goes first. A source that fails (refused, timed out, bad bytes) is skipped for
`failure_skip_s` and the next candidate is asked at once; a skipped member also leaves the chunk
trees (peer/membership.py), so its children re-attach to the next member in rank.

Hedging is relative. In a cold start every answer waits for the bytes queued ahead of it, so an
absolute deadline would hedge half the requests of a healthy cluster and double the load on
grandparents. A source is *suspect* when its own recent answer time is SLOW_FACTOR times what
all sources take here, or when it has been skipped since it was asked; only then, once the
deadline (a multiple of the recent answer time, never below `hedge_after_s`) has passed, is the
next source asked too (and for anyone after SLOW_FACTOR deadlines), and whichever answers first wins (the other request is cancelled). A
source that stays suspect for SLOW_STRIKES late answers or lost hedges is skipped as slow.
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
HEDGE_FACTOR = 4.0  # the deadline: this many times the recent answer time
SLOW_FACTOR = 3.0  # a source whose answers take this many times the others' is suspect
EWMA_WEIGHT = 0.1
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
        self.hedges = 0  # second requests sent (a counter for benchmarks and metrics)

    def hedge_after(self) -> float:
        return max(self._floor, HEDGE_FACTOR * self._answer_s)

    def outstanding(self, node_id: str) -> int:
        return self._outstanding.get(node_id, 0)

    def suspect(self, member: Member) -> bool:
        """Skipped since, or answering SLOW_FACTOR times slower than the sources here on average."""
        if member.skip_until > self._clock():
            return True
        own = self._member_s.get(member.node_id)
        return own is not None and own > max(self._floor, SLOW_FACTOR * self._answer_s)

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
                done, _ = await asyncio.wait(running, timeout=self.hedge_after(), return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    waited += 1
                    if waited < SLOW_FACTOR and not all(self.suspect(m) for m in running.values()):
                        continue  # a healthy source is busy: hedging would only add load
                    if not queue and more is not None:
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
