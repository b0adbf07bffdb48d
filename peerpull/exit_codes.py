"""The CLI's exit codes: one table from error class to code, looked up along the class's MRO.

The numbers are stable (scripts depend on them); the `--help` epilog is written from this table,
so the two cannot disagree.
"""

from __future__ import annotations

from converter.format import errors

OK = 0
INTERNAL = 70
INTERRUPTED = 130
UNHEALTHY = 12  # `peerpull doctor`: a check failed (no error class: every check ran)

# most specific first only for readability: lookup walks the MRO, so order does not matter
CODES: dict[type[errors.PeerpullError], int] = {
    errors.PeerpullError: 1,
    errors.ConfigError: 2,
    errors.FormatError: 3,
    errors.RegistryError: 4,
    errors.RegistryUnreachableError: 5,
    errors.AuthError: 6,
    errors.NotFoundError: 7,
    errors.UnsupportedError: 8,
    errors.AlreadyExistsError: 9,
    errors.FailedPreconditionError: 10,
    errors.ContainerdError: 11,
}

_MEANINGS: dict[int, str] = {
    OK: "ok",
    1: "the operation failed (e.g. a container exited non-zero, a node could not warm an image)",
    2: "bad configuration or usage", 3: "malformed data", 4: "registry error", 5: "registry or node unreachable",
    6: "authentication refused", 7: "not found", 8: "unsupported input", 9: "already exists", 10: "wrong state",
    11: "containerd refused a request", UNHEALTHY: "a doctor check failed", INTERNAL: "internal error", INTERRUPTED: "interrupted",
}


def exit_code(exc: errors.PeerpullError | type[errors.PeerpullError]) -> int:
    """The code of the nearest class in the MRO that has one (a registry 404 is 7, not 4)."""
    cls = exc if isinstance(exc, type) else type(exc)
    return next(CODES[c] for c in cls.__mro__ if c in CODES)


def error_class(code: int) -> type[errors.PeerpullError]:
    """The most general error class with this code (for re-raising a code a node reported)."""
    return next((cls for cls, c in CODES.items() if c == code), errors.PeerpullError)


def epilog() -> str:
    """`Exit codes: 0 ok, 1 …` for `--help`."""
    codes = sorted({OK, *CODES.values(), UNHEALTHY, INTERNAL, INTERRUPTED})
    return "Exit codes: " + ", ".join(f"{c} {_MEANINGS[c]}" for c in codes) + "."
