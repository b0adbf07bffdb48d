"""Which peer to ask for a chunk, and when to ask a second one: load-aware, hedged, quick to give up.

The candidates come from the membership (holders, then the chunk's ancestors in its fan-out
tree). Among holders, which are equally good, the one this node has the fewest requests in
flight to goes first. If the first source has not answered after the hedge deadline, the next is
asked as well and whichever answers first wins (the other request is cancelled): one slow peer
then costs a chunk the deadline, not its whole timeout. The deadline follows what peers take
here (a multiple of the recent answer time, never below `hedge_after_s`), so a cluster that is
merely busy does not hedge everything. A source that fails is skipped for `failure_skip_s`; one
that keeps losing to its hedge is skipped as slow.
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
HEDGE_FACTOR = 4.0  # hedge after this many times the recent answer time
EWMA_WEIGHT = 0.1
SLOW_STRIKES = 3  # hedges in a row a source loses before it is skipped as slow

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
        self._answer_s = 0.0  # moving average of answer times
        self.hedges = 0  # second requests sent (a counter for benchmarks and metrics)

    def hedge_after(self) -> float:
        return max(self._floor, HEDGE_FACTOR * self._answer_s)

    def outstanding(self, node_id: str) -> int:
        return self._outstanding.get(node_id, 0)

    def order(self, digest: str, members: list[Member]) -> list[Member]:
        """Holders of `digest` least loaded first (a stable sort), ancestors after them in tree order."""
        holders = [m for m in members if m.holds is not None and m.holds.might_hold(digest)]
        rest = [m for m in members if not (m.holds is not None and m.holds.might_hold(digest))]
        return [*sorted(holders, key=lambda m: self.outstanding(m.node_id)), *rest]

    async def fetch(self, ref: ChunkRef, members: list[Member], attempt: Attempt[T]) -> tuple[T, Member]:
        """The answer and the member that gave it; SourceExhausted when every member failed."""
        queue = self.order(ref.digest, members)
        running: dict[asyncio.Task[T], Member] = {}  # in the order they were asked
        try:
            while queue or running:
                if not running:
                    self._start(queue.pop(0), ref, attempt, running)
                deadline = self.hedge_after() if queue else None
                done, _ = await asyncio.wait(running, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # the deadline passed: ask the next source too
                    self.hedges += 1
                    self._start(queue.pop(0), ref, attempt, running)
                    continue
                for task in done:
                    asked_before = list(running.values())[:list(running).index(task)]
                    member = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        self._won(member, asked_before)
                        return task.result(), member
                    self._failed(member, ref, exc)
            raise SourceExhausted(ref.digest)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    def _start(self, member: Member, ref: ChunkRef, attempt: Attempt[T], running: dict[asyncio.Task[T], Member]) -> None:
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
        self._answer_s += EWMA_WEIGHT * ((self._clock() - started) - self._answer_s)
        return result

    def _won(self, member: Member, overtaken: list[Member]) -> None:
        self._strikes.pop(member.node_id, None)
        for loser in overtaken:  # asked first and overtaken by the hedge
            strikes = self._strikes[loser.node_id] = self._strikes.get(loser.node_id, 0) + 1
            if strikes >= SLOW_STRIKES:
                self._strikes.pop(loser.node_id, None)
                self._membership.failed(loser, "slow")

    def _failed(self, member: Member, ref: ChunkRef, exc: BaseException) -> None:
        if not isinstance(exc, (PeerFetchError, FormatError)):
            raise exc
        reason = exc.reason if isinstance(exc, PeerFetchError) else "bad_bytes"
        if self._on_failure is not None:
            self._on_failure(member, ref, reason, exc)
        self._membership.failed(member, reason)
