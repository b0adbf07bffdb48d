"""The fd holder: a tiny long-lived process that keeps a copy of the daemon's FUSE connection fd
(and the state negotiated at INIT) so the connection outlives a crash of the daemon; its
successor takes both back and serves on.

While any process holds a `/dev/fuse` fd the kernel keeps the connection and its mount alive:
readers of a crashed daemon's files wait instead of failing with ENOTCONN. The holder never reads
the fd, holds nothing else, runs in its own session (no event loop, one request at a time) and
exits when told, on SIGTERM, or once the held connection is gone (POLLERR/POLLHUP: the mount was
unmounted or aborted, so there is nothing left to keep).

Requests on its unix socket (mode 0600; the frames and peer checks of handover.py):
`put` (an fd + state; replaces what it held), `get` (a copy of the fd + the state), `drop`,
`ping`, `stop`.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from snapshotter.config import SnapshotterConfig
from snapshotter.fs.handover import (
    HandoverError,
    connect,
    exchange,
    listen,
    peer_uid,
    recv_frame,
    send_frame,
    trusted_uid,
)

log = structlog.get_logger(__name__)

DEFAULT_SOCKET = Path(SnapshotterConfig.fd_holder_socket)
REQUEST_TIMEOUT_S = 5.0  # one client cannot stall the holder for longer
_GONE = select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Stop(BaseException):  # not an Exception: the per-request guard must not swallow it
    pass


class FdHolder:
    """Serve requests on `sock_path` until stopped or the held connection is gone."""

    def __init__(self, sock_path: Path) -> None:
        self.sock_path = sock_path
        self._listener = listen(sock_path)
        self._ino = os.stat(sock_path).st_ino
        self._fd: int | None = None
        self._state: dict[str, Any] = {}
        self._since = 0.0

    def serve(self) -> str:
        """Why it stopped: "stopped" (a stop request or a signal) or "connection_gone"."""
        previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no terminal to lose; a detached holder outlives it
        log.info("fd_holder_started", socket=str(self.sock_path), pid=os.getpid())
        try:
            return self._loop()
        except _Stop:
            return "stopped"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def close(self) -> None:
        self._drop()
        self._listener.close()
        try:
            if os.stat(self.sock_path).st_ino == self._ino:  # a successor's socket stays
                self.sock_path.unlink()
        except FileNotFoundError:
            pass

    def _loop(self) -> str:
        while True:
            poller = select.poll()
            poller.register(self._listener, select.POLLIN)
            if self._fd is not None:
                poller.register(self._fd, 0)  # errors and hang-ups only: the holder never reads it
            ready = dict(poller.poll())
            # the held fd first: a put below may replace it by a new fd with the same number
            if self._fd is not None and ready.get(self._fd, 0) & _GONE:
                log.info("fd_holder_connection_gone", held_s=round(time.monotonic() - self._since, 1),
                         reason="the held connection ended (unmounted or aborted); nothing left to keep")
                return "connection_gone"
            if ready.get(self._listener.fileno(), 0) & select.POLLIN and self._accept():
                return "stopped"

    def _accept(self) -> bool:
        """Answer one client; True on a stop request. Nothing a client does ends the holder: it
        would take the connection of every running container with it."""
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:  # e.g. ECONNABORTED: the client left first
            log.warning("fd_holder_accept_failed", error=str(exc))
            return False
        try:
            return self._handle(conn)
        except Exception as exc:
            log.error("fd_holder_request_failed", error=f"{type(exc).__name__}: {exc}")
            return False

    def _handle(self, conn: socket.socket) -> bool:
        with conn:
            pid, uid = peer_uid(conn)
            if not trusted_uid(uid):
                log.warning("fd_holder_refused", pid=pid, uid=uid, reason="not this user or root")
                return False
            try:
                body, fd = recv_frame(conn, time.monotonic() + REQUEST_TIMEOUT_S)
            except HandoverError as exc:
                log.warning("fd_holder_refused", pid=pid, uid=uid, reason=str(exc))
                return False
            conn.settimeout(REQUEST_TIMEOUT_S)
            try:
                return self._answer(conn, body, fd, pid)
            except OSError as exc:
                log.warning("fd_holder_reply_failed", pid=pid, error=str(exc))
                return False

    def _answer(self, conn: socket.socket, body: dict[str, Any], fd: int | None, pid: int) -> bool:
        op = body.get("op")
        if op == "put" and fd is not None and isinstance(body.get("state"), dict):
            self._drop()
            self._fd, self._state, self._since = fd, body["state"], time.monotonic()
            log.info("fd_holder_put", pid=pid)
            send_frame(conn, {"kind": "ok"})
            return False
        if fd is not None:
            os.close(fd)  # only a put carries an fd
        if op == "put":
            send_frame(conn, {"kind": "error", "error": "a put carries one fd and a state map"})
            return False
        if op == "get":
            if self._fd is None:
                send_frame(conn, {"kind": "error", "error": "the fd holder holds no session"})
            else:
                send_frame(conn, {"kind": "session", "state": self._state}, self._fd)
                log.info("fd_holder_get", pid=pid)
            return False
        if op in ("drop", "stop", "ping"):
            if op == "drop":
                self._drop()
                log.info("fd_holder_dropped", pid=pid)
            send_frame(conn, {"kind": "ok", "held": self._fd is not None, "pid": os.getpid()})
            return bool(op == "stop")
        send_frame(conn, {"kind": "error", "error": f"unknown request {op!r}"})
        return False

    def _drop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._state = None, {}


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


# the daemon's side


def holder_put(sock_path: Path, fd: int, state: dict[str, Any], timeout_s: float = REQUEST_TIMEOUT_S) -> None:
    """Give the holder a copy of `fd` and `state` (replacing what it held); `fd` stays open here."""
    _request(sock_path, {"op": "put", "state": state}, fd, timeout_s)


def holder_get(sock_path: Path, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int, dict[str, Any]] | None:
    """A copy of the held fd and its state; None when the holder holds nothing."""
    reply, fd = _request(sock_path, {"op": "get"}, None, timeout_s, allow_error=True)
    if reply.get("kind") != "session" or fd is None:
        if fd is not None:
            os.close(fd)
        return None
    state = reply.get("state")
    return fd, state if isinstance(state, dict) else {}


def holder_drop(sock_path: Path, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
    _request(sock_path, {"op": "drop"}, None, timeout_s)


def holder_stop(sock_path: Path, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
    _request(sock_path, {"op": "stop"}, None, timeout_s)


def holder_ping(sock_path: Path, timeout_s: float = REQUEST_TIMEOUT_S) -> int | None:
    """The holder's pid, or None when no holder answers at `sock_path`."""
    try:
        reply, _ = _request(sock_path, {"op": "ping"}, None, timeout_s)
    except HandoverError:
        return None
    pid = reply.get("pid")
    return pid if isinstance(pid, int) else None


def spawn_holder(sock_path: Path, log_path: Path | None = None, systemd: bool | None = None) -> int:
    """Start a detached holder at `sock_path` (unless one answers there already); its pid.

    Detached means its own session, reparented to init, so the daemon's death does not take it
    along. Under systemd (`systemd` None: when /run/systemd/system exists) it also gets its own
    scope, outside the daemon's cgroup, so stopping the daemon's unit does not kill it either.
    Returns once the holder listens."""
    running = holder_ping(sock_path)
    if running is not None:
        return running
    command = [sys.executable, "-m", "snapshotter.fs.fd_holder", "--socket", str(sock_path), "--detach"]
    if systemd is None:
        systemd = Path("/run/systemd/system").is_dir() and shutil.which("systemd-run") is not None
    if systemd:
        scoped = ["systemd-run", "--scope", "--quiet", "--collect", f"--unit=peerpull-fd-holder-{os.getpid()}",
                  "--", *command]
        try:
            _start(scoped, log_path)
        except HandoverError as exc:  # e.g. no D-Bus to systemd in this namespace: detached is still something
            log.warning("fd_holder_scope_failed", error=str(exc),
                        consequence="the holder runs detached in the daemon's cgroup: stopping the daemon's "
                                    "unit as a whole kills it")
            _start(command, log_path)
    else:
        _start(command, log_path)
    pid = holder_ping(sock_path)
    if pid is None:
        raise HandoverError(f"the fd holder started but does not answer at {sock_path}")
    return pid


def _start(command: list[str], log_path: Path | None) -> None:
    """Run a `--detach` holder command: it returns once the socket listens, the holder lives on."""
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # the child's stdout and stderr
    try:
        subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True, cwd="/",
                       check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise HandoverError(f"the fd holder did not start ({command[0]}): {exc}") from None
    finally:
        if not isinstance(out, int):
            out.close()


def _request(sock_path: Path, body: dict[str, Any], fd: int | None, timeout_s: float,
             allow_error: bool = False) -> tuple[dict[str, Any], int | None]:
    deadline = time.monotonic() + timeout_s
    with connect(sock_path, timeout_s) as sock:
        reply, got = exchange(sock, body, fd, deadline, sock_path)
    if reply.get("kind") == "error" and not allow_error:
        if got is not None:
            os.close(got)
        raise HandoverError(f"the fd holder at {sock_path} refused {body['op']}: {reply.get('error')}")
    return reply, got


def run_holder(sock_path: Path, detach: bool) -> int:
    """The holder's main: listen, (detach), serve; the exit status."""
    holder = FdHolder(sock_path)  # listening before a detaching parent returns: callers may connect at once
    if detach:
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    reason = holder.serve()
    log.info("fd_holder_stopped", reason=reason)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapshotter.fs.fd_holder")
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET)
    parser.add_argument("--detach", action="store_true")
    args = parser.parse_args(argv)
    structlog.configure(processors=[structlog.processors.add_log_level,
                                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                                    structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        return run_holder(args.socket, args.detach)
    except HandoverError as exc:
        print(f"fd-holder: error: {exc}", file=sys.stderr)
        return 10


if __name__ == "__main__":
    sys.exit(main())
