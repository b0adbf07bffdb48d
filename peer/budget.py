"""A byte budget shared by coroutines: what the peer server holds in memory while answering."""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """`acquire(n)` waits until `n` more bytes fit under the limit, in arrival order.

    A request larger than the whole limit is let through alone (when nothing else is held), so it
    can never wait forever.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self.used += n
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(n)  # granted just as we were cancelled
            else:
                self._waiters = deque(w for w in self._waiters if w[1] is not waiter)
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            n, waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += n
                waiter.set_result(None)
