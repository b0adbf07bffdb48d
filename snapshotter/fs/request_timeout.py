"""The kernel's FUSE request timeouts (Linux 6.14+) against the longest fetch a read may wait for.

With `fs.fuse.default_request_timeout` or `fs.fuse.max_request_timeout` set, the kernel aborts the
whole FUSE connection (every container reading from the mount gets ENOTCONN) when one request
goes unanswered for that long. A read of an unfetched chunk waits for up to two peers and then
the origin registry, so an admin's timeout shorter than that turns one slow registry into a
broken node. The daemon checks once at start-up and warns (`fuse_request_timeout_short`) with
the setting to change.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from converter.registry.config import RegistryConfig
from peer.config import PeerConfig

log = structlog.get_logger(__name__)

PROC_DIR = Path("/proc/sys/fs/fuse")
# peer.membership.Membership.candidates_for asks at most this many peers before the origin
PEERS_ASKED = 2


def longest_fetch_s(peer: PeerConfig, registry: RegistryConfig) -> float:
    """The longest a FUSE read of an unfetched chunk can wait by the config: every peer asked up
    to its deadline, then the origin's bounded request with its retries."""
    return PEERS_ASKED * peer.peer_timeout_s + registry.request_deadline_s


def kernel_request_timeout_s(proc_dir: Path = PROC_DIR, requested_s: int = 0) -> tuple[int, str] | None:
    """The request timeout the kernel applies to a connection that asked for `requested_s` (0: none)
    at INIT, and the sysctl that sets it; None when there is none (or the kernel predates them).

    A server's own request (or else `default_request_timeout`) is capped by `max_request_timeout`;
    with neither, the maximum applies alone."""
    default = _read_int(proc_dir / "default_request_timeout")
    maximum = _read_int(proc_dir / "max_request_timeout")
    timeout, source = (requested_s, "") if requested_s else (default, "fs.fuse.default_request_timeout")
    if maximum and (not timeout or maximum < timeout):
        timeout, source = maximum, "fs.fuse.max_request_timeout"
    if not timeout:
        return None
    return timeout, source or "the request timeout asked for at INIT"


def check_request_timeout(peer: PeerConfig, registry: RegistryConfig, proc_dir: Path | None = None,
                          requested_s: int = 0) -> bool:
    """Warn once if the kernel would abort the connection before the longest fetch can end; True
    when it warned."""
    found = kernel_request_timeout_s(proc_dir or PROC_DIR, requested_s)
    if found is None:
        return False
    timeout, setting = found
    longest = longest_fetch_s(peer, registry)
    if timeout >= longest:
        log.debug("fuse_request_timeout_ok", timeout_s=timeout, setting=setting, longest_fetch_s=longest)
        return False
    log.warning("fuse_request_timeout_short", timeout_s=timeout, setting=setting, longest_fetch_s=longest,
                hint=f"a read waiting for the registry longer than {timeout} s aborts the FUSE connection "
                     f"(ENOTCONN in every container on it): raise {setting} to at least {int(longest) + 1} "
                     f"(sysctl -w {setting}={int(longest) + 1}) or lower registry.request_deadline_s / "
                     "peer.peer_timeout_s")
    return True


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, PermissionError, ValueError):
        return 0
