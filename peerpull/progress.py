"""Progress of one long piece of work: a bar on a terminal, quiet structured logs otherwise.

`with Progress(total, label) as p: p.advance(n)`. On a terminal (stderr a tty) it draws a rich bar
on stderr that disappears when done; otherwise it logs `progress_started` and `progress_finished`
(label, done, total, seconds) and nothing in between, so piped output and CI logs stay short.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Progress:
    def __init__(self, total: float | None, label: str, *, enabled: bool | None = None) -> None:
        self.total, self.label, self.done = total, label, 0.0
        self._bar = sys.stderr.isatty() if enabled is None else enabled
        self._rich: Any = None
        self._task: Any = None
        self._t0 = 0.0

    def __enter__(self) -> Progress:
        self._t0 = time.monotonic()
        if self._bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=Console(stderr=True), transient=True)
            self._rich.start()
            self._task = self._rich.add_task(self.label, total=self.total)
        else:
            log.info("progress_started", label=self.label, total=self.total)
        return self

    def advance(self, n: float = 1, description: str | None = None) -> None:
        self.done += n
        if self._rich is not None:
            self._rich.update(self._task, advance=n, **({"description": description} if description else {}))

    def set_total(self, total: float) -> None:
        """When the total becomes known only after the work started (e.g. a build's step count)."""
        self.total = total
        if self._rich is not None:
            self._rich.update(self._task, total=total)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
        else:
            log.info("progress_finished", label=self.label, done=self.done, total=self.total,
                     seconds=round(time.monotonic() - self._t0, 3), ok=exc_type is None)
