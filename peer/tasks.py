"""Background tasks with an owner: started through a `TaskSet`, cancelled and awaited at its close,
their failures retrieved (and logged unless expected), never orphaned."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class TaskSet:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, quiet: bool = False) -> asyncio.Task[Any] | None:
        """Run `coro` in the background; `quiet`: its failure is expected and handled elsewhere.

        None (and the coroutine closed unrun) once the set is closed.
        """
        if self._closed:
            coro.close()
            return None
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, quiet))
        return task

    def _done(self, task: asyncio.Task[Any], quiet: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved either way: no "exception was never retrieved" at exit
        if exc is not None and not quiet:
            log.warning("background_task_failed", owner=self._owner, task=task.get_name(), error=repr(exc))

    async def close(self) -> None:
        """Cancel every task and wait for them to end."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
