"""Concurrent requests for the same key share one in-flight fetch.

The one implementation every stage uses (the fetcher's tiers and a local reader's chunk loads, the
snapshotter's layer resolution). It owns the fetch tasks it starts: `close()` cancels and awaits
them, and each owner registers that with the daemon's exit stack, so no task outlives its room."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from peer.tasks import TaskSet

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[T]] = {}
        self._waiting: dict[str, int] = {}
        self._tasks = TaskSet("singleflight")

    def inflight(self, key: str) -> bool:
        return key in self._inflight

    def waiters(self, key: str) -> int:
        """How many callers wait for the fetch of `key` now."""
        return self._waiting.get(key, 0)

    async def do(self, key: str, fetch: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run `fetch()` unless a fetch for `key` is already running; either way, return its result.

        A waiter that is cancelled does not cancel the shared fetch for the others.
        """
        future = self.start(key, fetch)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            return await asyncio.shield(future)
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]

    def start(self, key: str, fetch: Callable[[], Coroutine[Any, Any, T]]) -> asyncio.Future[T]:
        """Start `fetch()` for `key` unless one is running, without waiting (look-ahead); the shared future.

        Nobody needs to await it: a failure is marked retrieved, and the next `do` starts afresh.
        """
        future = self._inflight.get(key)
        if future is None:
            # quiet: a failure reaches the waiters through the shared future (_settle)
            task = self._tasks.spawn(fetch(), name=f"singleflight:{key}", quiet=True)
            if task is None:
                raise RuntimeError("SingleFlight is closed")
            future = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
            task.add_done_callback(lambda t: self._settle(key, future, t))
        return future

    async def close(self) -> None:
        """Cancel every fetch still running and wait for them to end."""
        await self._tasks.close()

    def _settle(self, key: str, future: asyncio.Future[T], task: asyncio.Task[Any]) -> None:
        self._inflight.pop(key, None)
        if future.done():
            return
        if task.cancelled():
            future.cancel()
        elif (exc := task.exception()) is not None:
            future.set_exception(exc)
            future.exception()  # mark it retrieved: every waiter may have gone already
        else:
            future.set_result(task.result())
