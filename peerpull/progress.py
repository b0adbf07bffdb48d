"""Progress of long commands (`pull`, `warm`): a bar on a terminal, structured log events otherwise.

On a terminal (stderr a TTY) a rich progress line is redrawn in place and left showing the final
state; anywhere else (CI, a pipe, a Job's log) each update is one log event with stable keys, and
nothing else is written, so machine-read output stays clean.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

log = structlog.get_logger(__name__)


class Progress:
    """`with Progress("warm_progress", "warming IMAGE") as p: p.update(completed=3, total=10, text="…")`."""

    def __init__(self, event: str, description: str, *, enabled: bool = True, tty: bool | None = None,
                 **fields: Any) -> None:
        self._event = event
        self._fields = fields  # repeated in every log event (e.g. image, node)
        self._enabled = enabled
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._bar: RichProgress | None = None
        self._task: Any = None
        if enabled and self._tty:
            self._bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[text]}"), TimeElapsedColumn(),
                                     console=Console(file=sys.stderr), transient=False)
            self._task = self._bar.add_task(description, total=None, text="")

    @property
    def on_terminal(self) -> bool:
        return self._bar is not None

    def update(self, completed: int | None = None, total: int | None = None, text: str = "", **fields: Any) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total, text=text)
            return
        log.info(self._event, **self._fields, **{k: v for k, v in (("completed", completed), ("total", total),
                                                                  ("text", text)) if v not in (None, "")}, **fields)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
