"""One check's result, what every check is given, and running them so that none can traceback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from peerpull.config import PeerpullConfig

log = structlog.get_logger(__name__)
CHECK_TIMEOUT_S = 15.0  # a check that hangs (a wedged socket) is a failed check, not a hung doctor


@dataclass(frozen=True)
class CheckResult:
    name: str  # stable snake_case: scripts match on it
    ok: bool
    message: str  # what was found, and on failure the fix

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DoctorContext:
    """What the checks look at, plus what one group learns for another (containerd's version)."""

    config: PeerpullConfig
    containerd_config: Path
    timeout_s: float = 3.0  # per network probe
    facts: dict[str, Any] = field(default_factory=dict)


Check = Callable[[DoctorContext], Awaitable[list[CheckResult]]]


def ok(name: str, message: str) -> CheckResult:
    return CheckResult(name, True, message)


def failed(name: str, message: str) -> CheckResult:
    return CheckResult(name, False, message)


async def run_checks(context: DoctorContext, checks: Sequence[tuple[str, Check]]) -> list[CheckResult]:
    """Every group in order (later ones may read earlier facts); an unexpected error or a hang is a
    failed check under the group's name, with its message."""
    results: list[CheckResult] = []
    for name, check in checks:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                results.extend(await check(context))
        except TimeoutError:
            results.append(failed(name, f"the check did not finish within {CHECK_TIMEOUT_S:g} s"))
        except Exception as exc:  # the one guard: doctor reports, it never tracebacks
            log.debug("doctor_check_crashed", check=name, error=repr(exc))
            results.append(failed(name, f"the check itself failed: {type(exc).__name__}: "
                                        f"{' '.join(str(exc).split())[:300]}"))
    return results
