"""Requests that wait for a slot travel together: one batching queue for every tier that needs one.

A request queues under its key (a peer, a blob) and waits for a slot (a per-peer semaphore, a
registry's priority slots). Whoever gets a slot while its request is still queued takes a batch:
the oldest requests of its key, or, with a caller-given selection, the run around its own (the
origin coalesces adjacent frames into one Range request); later ones keep their place. Every
waiter gets its result or the batch's exception; a waiter that is cancelled leaves the queue; if
the task sending a batch is cancelled, the other requests of that batch queue again rather than
wait for an answer that will never come.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
T = TypeVar("T")

Batch = list[tuple[R, asyncio.Future[T]]]
Select = Callable[[list[R], int], list[int]]


class _Requeue(Exception):
    """Set on the requests of a batch whose sender was cancelled: their waiters queue them again."""


def oldest(limit: int) -> Select[Any]:
    """The selection that takes the `limit` oldest queued requests."""
    return lambda queued, _own: list(range(min(limit, len(queued))))


class BatchQueue(Generic[K, R, T]):
    """Per key, the requests waiting for a slot (oldest first); `send` answers one batch of them.

    `send(key, batch)` resolves each `(request, future)` of the batch as its answer arrives; a
    future it leaves pending gets an error, and an exception it raises goes to every waiter.
    `select(queued, own)` picks the batch from the queued requests of a key (oldest first) given
    the position of the caller's own one.
    """

    def __init__(self, send: Callable[[K, Batch[R, T]], Awaitable[None]], select: Select[R],
                 send_others: bool = False) -> None:
        self._send = send
        self._select = select
        # with send_others, a waiter that gets a slot after its own request left in someone else's
        # batch (still in flight) sends the oldest queued batch instead of handing the slot on: with
        # thousands queued behind a few slots, each slot then carries a batch, where otherwise it
        # passed through every stale waiter first, one event-loop turn each, before the next batch
        self._send_others = send_others
        # per key, requests waiting to be sent, oldest first (a dict: O(1) membership and removal)
        self._queues: dict[K, dict[asyncio.Future[T], R]] = {}

    def queued(self, key: K) -> int:
        """How many requests of `key` wait to be sent now."""
        return len(self._queues.get(key, ()))

    def waiting(self, key: K) -> list[R]:
        """The requests of `key` waiting to be sent now."""
        return list(self._queues.get(key, {}).values())

    async def submit(self, key: K, request: R, slot: Callable[[], AbstractAsyncContextManager[Any]]) -> T:
        """The answer to `request`: sent in a batch by whichever waiter of `key` gets a slot first."""
        loop = asyncio.get_running_loop()
        while True:
            future: asyncio.Future[T] = loop.create_future()
            queue = self._queues.setdefault(key, {})
            queue[future] = request
            try:
                async with slot():
                    # still queued: send a batch (ours, or ours goes with a later one: every queued
                    # request has a waiter, and the last of them always sends its own)
                    if future in queue:
                        await self._run(key, self._take(key, queue, future))
                    elif self._send_others and queue and not future.done():
                        await self._run(key, self._take(key, queue, None))
                return await future
            except _Requeue:
                continue
            except BaseException:
                queue.pop(future, None)
                if not future.done():
                    future.cancel()
                raise
            finally:
                if not queue and self._queues.get(key) is queue:
                    del self._queues[key]

    def _take(self, key: K, queue: dict[asyncio.Future[T], R], own: asyncio.Future[T] | None) -> Batch[R, T]:
        futures = list(queue)
        chosen = self._select(list(queue.values()), 0 if own is None else futures.index(own))
        return [(queue.pop(futures[i]), futures[i]) for i in chosen]

    async def _run(self, key: K, batch: Batch[R, T]) -> None:
        try:
            await self._send(key, batch)
        except asyncio.CancelledError:
            _settle(batch, _Requeue())  # the others queue again; ours is cancelled by the caller
            raise
        except Exception as exc:  # every waiter of the batch learns of the failure
            _settle(batch, exc)
        else:
            _settle(batch, RuntimeError("a batch left a request unanswered"))

    def cancel_all(self) -> None:
        """Cancel every queued request (their waiters see CancelledError)."""
        for queue in self._queues.values():
            for future in queue:
                future.cancel()
            queue.clear()  # waiters hold their key's queue: empty it, not only forget it
        self._queues.clear()


def _settle(batch: Batch[Any, Any], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
            future.exception()  # retrieved by whoever awaits it, or by nobody if it was cancelled
