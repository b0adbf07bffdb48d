"""peer/batching.py: requests queued behind a slot travel in batches, and every waiter hears back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from peer.batching import Batch, BatchQueue, oldest


class Recorder:
    """A `send` that records its batches and answers each request with its double, once released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail: BaseException | None = None
        self.leave_unanswered = False
        self.started = asyncio.Event()

    async def send(self, key: str, batch: Batch[int, int]) -> None:
        self.batches.append([request for request, _ in batch])
        self.started.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        for request, future in batch:
            if not future.done() and not self.leave_unanswered:
                future.set_result(request * 2)


def one_slot() -> tuple[asyncio.Semaphore, Any]:
    sem = asyncio.Semaphore(1)
    return sem, lambda: sem


async def wait_until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0)


async def test_waiters_behind_a_slot_go_in_one_batch_oldest_first() -> None:
    rec = Recorder()
    queue: BatchQueue[str, int, int] = BatchQueue(rec.send, oldest(128))
    sem, slot = one_slot()
    await sem.acquire()  # the slot is busy: every request queues
    tasks = [asyncio.create_task(queue.submit("a", i, slot)) for i in range(5)]
    await wait_until(lambda: queue.queued("a") == 5)
    sem.release()
    assert await asyncio.gather(*tasks) == [0, 2, 4, 6, 8]
    assert rec.batches == [[0, 1, 2, 3, 4]]
    assert queue.queued("a") == 0


async def test_batches_are_bounded_and_later_requests_keep_their_place() -> None:
    rec = Recorder()
    queue: BatchQueue[str, int, int] = BatchQueue(rec.send, oldest(2))
    sem, slot = one_slot()
    await sem.acquire()
    tasks = [asyncio.create_task(queue.submit("a", i, slot)) for i in range(5)]
    await wait_until(lambda: queue.queued("a") == 5)
    sem.release()
    assert await asyncio.gather(*tasks) == [0, 2, 4, 6, 8]
    assert rec.batches == [[0, 1], [2, 3], [4]]


async def test_keys_queue_apart() -> None:
    rec = Recorder()
    queue: BatchQueue[str, int, int] = BatchQueue(rec.send, oldest(128))
    sem, slot = one_slot()
    await sem.acquire()
    tasks = [asyncio.create_task(queue.submit(key, i, slot)) for i, key in enumerate("abab")]
    await wait_until(lambda: queue.queued("a") == 2 and queue.queued("b") == 2)
    sem.release()
    await asyncio.gather(*tasks)
    assert sorted(rec.batches) == [[0, 2], [1, 3]]


async def test_selection_takes_the_run_around_the_own_request() -> None:
    rec = Recorder()

    def neighbours(queued: list[int], own: int) -> list[int]:  # requests within 1 of the own one
        return [i for i, r in enumerate(queued) if abs(r - queued[own]) <= 1]

    queue: BatchQueue[str, int, int] = BatchQueue(rec.send, neighbours)
    sem, slot = one_slot()
    await sem.acquire()
    tasks = [asyncio.create_task(queue.submit("a", r, slot)) for r in (10, 20, 11, 21, 9)]
    await wait_until(lambda: queue.queued("a") == 5)
    sem.release()
    assert await asyncio.gather(*tasks) == [20, 40, 22, 42, 18]
    assert rec.batches == [[10, 11, 9], [20, 21]]


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    rec = Recorder()
    queue: BatchQueue[str, int, int] = BatchQueue(rec.send, oldest(128))
    sem, slot = one_slot()
    await sem.acquire()
    tasks = [asyncio.create_task(queue.submit("a", i, slot)) for i in range(3)]
    await wait_until(lambda: queue.queued("a") == 3)
    tasks[1].cancel()
    await wait_until(lambda: queue.queued("a") == 2)
    sem.release()
    assert await tasks[0] == 0 and await tasks[2] == 4
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert rec.batches == [[0, 2]]


async def test_a_batch_exception_reaches_every_waiter() -> None:
    rec = Recorder()
    rec.fail = ConnectionError("peer went away")
    queue: BatchQueue[str, int, int] = BatchQueue(rec.send, oldest(128))
    sem, slot = one_slot()
    await sem.acquire()
    tasks = [asyncio.create_task(queue.submit("a", i, slot)) for i in range(4)]
    await wait_until(lambda: queue.queued("a") == 4)
    sem.release()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is rec.fail for r in results)
    assert rec.batches == [[0, 1, 2, 3]]


async def test_an_unanswered_request_gets_an_error_not_a_hang() -> None:
    rec = Recorder()
    rec.leave_unanswered = True
    queue: BatchQueue[str, int, int] = BatchQueue(rec.send, oldest(128))
    _, slot = one_slot()
    with pytest.raises(RuntimeError, match="unanswered"):
        await queue.submit("a", 1, slot)


async def test_the_others_of_a_cancelled_sender_queue_again() -> None:
    rec = Recorder()
    rec.release.clear()
    queue: BatchQueue[str, int, int] = BatchQueue(rec.send, oldest(128))
    sem, slot = one_slot()
    await sem.acquire()
    tasks = [asyncio.create_task(queue.submit("a", i, slot)) for i in range(3)]
    await wait_until(lambda: queue.queued("a") == 3)
    sem.release()
    await rec.started.wait()  # the first waiter sends all three and hangs
    assert rec.batches == [[0, 1, 2]]
    tasks[0].cancel()
    await wait_until(lambda: queue.queued("a") == 2)  # the other two are queued again
    rec.release.set()
    assert await tasks[1] == 2 and await tasks[2] == 4
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert rec.batches[1:] == [[1, 2]]


async def test_cancel_all_ends_every_queued_waiter() -> None:
    rec = Recorder()
    queue: BatchQueue[str, int, int] = BatchQueue(rec.send, oldest(128))
    sem, slot = one_slot()
    await sem.acquire()
    tasks = [asyncio.create_task(queue.submit("a", i, slot)) for i in range(3)]
    await wait_until(lambda: queue.queued("a") == 3)
    queue.cancel_all()
    sem.release()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert rec.batches == []
