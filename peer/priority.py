"""Slots to a registry where on-demand reads go first: a waiting foreground request always gets
the next free slot, and background fetches (prefetch, warm-up) never hold the last `reserved`."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PrioritySlots:
    def __init__(self, limit: int, reserved: int = 2) -> None:
        self._limit = max(1, limit)
        self._background_limit = max(1, self._limit - reserved)
        self._used = 0
        self._background_used = 0
        self._foreground: deque[asyncio.Future[None]] = deque()
        self._background: deque[asyncio.Future[None]] = deque()

    def _free_for(self, background: bool) -> bool:
        if self._used >= self._limit:
            return False
        return not background or (self._background_used < self._background_limit and not self._foreground)

    def _take(self, background: bool) -> None:
        self._used += 1
        self._background_used += background

    def _release(self, background: bool) -> None:
        self._used -= 1
        self._background_used -= background
        self._wake()

    def _wake(self) -> None:
        while self._foreground and self._free_for(False):
            waiter = self._foreground.popleft()
            if not waiter.done():
                self._take(False)
                waiter.set_result(None)
        while self._background and self._free_for(True):
            waiter = self._background.popleft()
            if not waiter.done():
                self._take(True)
                waiter.set_result(None)

    @asynccontextmanager
    async def slot(self, background: bool = False) -> AsyncIterator[None]:
        queue = self._background if background else self._foreground
        if not queue and self._free_for(background):
            self._take(background)
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release(background)  # granted just as we were cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release(background)

    @property
    def in_use(self) -> tuple[int, int]:
        """(all, background) slots held now."""
        return self._used, self._background_used
