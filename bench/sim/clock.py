"""An asyncio event loop on a virtual clock: nothing waits for real time.

The loop's selector never blocks: asked to wait `t` seconds for I/O (there is none in the
simulation), it moves the clock `t` ahead instead, so every `asyncio.sleep`, `asyncio.timeout`
and `wait_for` of the real peer code runs as it would, only without the wait. A loop with nothing
scheduled and tasks still waiting is a deadlock of the simulated cluster: `Deadlock` says so.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class Deadlock(RuntimeError):
    """Every simulated task waits and nothing is scheduled: nothing can ever happen again."""


class _Map(Mapping[Any, selectors.SelectorKey]):
    def __init__(self, keys: dict[int, selectors.SelectorKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys[fileobj if isinstance(fileobj, int) else fileobj.fileno()]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._keys)


class _VirtualSelector(selectors.BaseSelector):
    """Keeps registrations (the loop's self-pipe) and turns every wait into a clock advance."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = self._keys[fd] = selectors.SelectorKey(fileobj, fd, events, data)
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj if isinstance(fileobj, int) else fileobj.fileno())

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Deadlock("every simulated task waits and nothing is scheduled")
        if timeout > 0:
            self._clock.now += timeout
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return _Map(self._keys)


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock or VirtualClock()
        super().__init__(_VirtualSelector(self.clock))
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self.clock.now


def run(main: Coroutine[Any, Any, T], clock: VirtualClock | None = None) -> T:
    """Run `main` to its end on a fresh virtual loop (like asyncio.run)."""
    loop = VirtualLoop(clock)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
