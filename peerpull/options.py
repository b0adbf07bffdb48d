"""Argument types the CLI and its subcommands share (sizes, listen addresses).

A module of its own so `peerpull.cli` and `peerpull.commands.*` both import it at the top level
and never each other.
"""

from __future__ import annotations

import argparse
import re

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`1048576`, `1MiB`, `512k`, `4M` → bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512KiB, 4MiB)")
    unit = (match.group(2) or "b")[0].lower()
    return int(match.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` → (host, port); the host may itself contain colons (IPv6)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
