"""A local address that is not loopback: one end of a veth pair in this namespace carries a /32,
so a registry bound to it is reachable from this host but does not get the plain-HTTP treatment
loopback registries get automatically (needs root and iproute2)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@contextmanager
def non_loopback_address(octet: int = 1) -> Iterator[str]:
    """Yield an address such as 10.254.<pid-derived>.<octet>, local to this host, until the block ends."""
    tag = f"ppl{os.getpid() % 100000}"
    address = f"10.254.{os.getpid() % 250}.{octet}"
    _ip("link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b")
    try:
        _ip("addr", "add", f"{address}/32", "dev", f"{tag}a")
        _ip("link", "set", f"{tag}a", "up")
        _ip("link", "set", f"{tag}b", "up")
        yield address
    finally:
        subprocess.run(["ip", "link", "del", f"{tag}a"], capture_output=True, timeout=30)
