"""Bounded settings: each config section declares its own limits next to its defaults.

A section field made with `setting(default, lo=…, hi=…)` or `setting(default, choices=…)` carries
its bounds in the dataclass field's metadata; `check_section` enforces them once, at start-up, so
a zero, negative or absurd value is a one-line `ConfigError` instead of a busy loop or a hang.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from converter.format.errors import ConfigError


def setting(default: Any, *, lo: float | None = None, hi: float | None = None,
            choices: tuple[str, ...] | None = None, shown: str | None = None) -> Any:
    """A dataclass field with a default and the range (inclusive) or choices it must keep;
    `shown` describes a default that depends on the machine (for the docs)."""
    return dataclasses.field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "shown": shown})


def _human(value: float) -> str:
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value} ({value >> 20} MiB)"
    return str(value)


def check_section(section: Any, name: str) -> None:
    """Raise ConfigError naming `name.field` for the first value outside its declared bounds."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        lo, hi, choices = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("choices")
        where = f"{name}.{f.name}"
        if choices is not None:
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                if item not in choices:
                    raise ConfigError(f"{where} must be one of {', '.join(choices)} (got {item!r})")
        if value is None or isinstance(value, (str, tuple)):
            continue
        if lo is not None and value < lo:
            raise ConfigError(f"{where} must be at least {_human(lo)} (got {value})")
        if hi is not None and value > hi:
            raise ConfigError(f"{where} must be at most {_human(hi)} (got {value})")
