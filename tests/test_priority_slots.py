"""Origin slots: on-demand requests overtake queued background ones; background never takes the last slots."""

from __future__ import annotations

import asyncio

from peer.priority import PrioritySlots


async def test_foreground_overtakes_background_and_reserved_slots_stay_free() -> None:
    slots = PrioritySlots(4, reserved=2)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(name: str, background: bool) -> None:
        async with slots.slot(background):
            order.append(name)
            await release.wait()

    background = [asyncio.create_task(hold(f"bg{i}", True)) for i in range(5)]
    await asyncio.sleep(0)
    assert slots.in_use == (2, 2)  # two background slots, the last two kept free
    fg = [asyncio.create_task(hold(f"fg{i}", False)) for i in range(3)]
    await asyncio.sleep(0)
    assert order == ["bg0", "bg1", "fg0", "fg1"]  # on-demand requests got the reserved slots at once
    release.set()
    await asyncio.gather(*background, *fg)
    # once slots freed, the waiting foreground request went before the three queued background ones
    assert order.index("fg2") < order.index("bg2")
    assert slots.in_use == (0, 0)


async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    slots = PrioritySlots(1, reserved=0)
    async with slots.slot():
        waiter = asyncio.create_task(slots.slot().__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert slots.in_use == (0, 0)
    async with slots.slot(background=True):
        assert slots.in_use == (1, 1)
