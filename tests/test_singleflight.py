"""The one single-flight: shared fetches, look-ahead starts, and no task outliving close()."""

from __future__ import annotations

import asyncio

import pytest

from peer.singleflight import SingleFlight


async def test_concurrent_callers_share_one_fetch_and_start_joins_it() -> None:
    flights: SingleFlight[int] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 7

    flights.start("k", fetch)  # a look-ahead nobody awaits yet
    waiters = [asyncio.ensure_future(flights.do("k", fetch)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiters) == [7] * 5 and calls == 1
    assert not flights.inflight("k")


async def test_close_cancels_and_awaits_running_fetches() -> None:
    flights: SingleFlight[int] = SingleFlight()
    started, ended = asyncio.Event(), asyncio.Event()

    async def forever() -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()
        return 0

    waiter = asyncio.ensure_future(flights.do("k", forever))
    await started.wait()
    await flights.close()
    assert ended.is_set()  # the task ran its cleanup before close() returned
    with pytest.raises(asyncio.CancelledError):
        await waiter
    with pytest.raises(RuntimeError):
        flights.start("other", forever)
