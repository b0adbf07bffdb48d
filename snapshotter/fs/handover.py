"""Handing a FUSE session (its `/dev/fuse` fd and the state negotiated at INIT) to another process
over a unix socket: the fd travels as SCM_RIGHTS, the state as versioned, size-capped msgpack.

The successor listens (`receive_session`), the running daemon connects and sends
(`send_session`), and returns only once the successor has acknowledged: until then it still owns
the session. Both ends check the other's credentials (SO_PEERCRED: this process's uid or root)
on top of the socket's 0600 mode, so another local user cannot inject a session nor take one;
a refused or garbled sender is logged and the successor keeps waiting for the real one until its
deadline. The fd holder (fd_holder.py) speaks the same frames.

A frame: magic `PPFD`, version (u16), body length (u32), msgpack body; at most one fd attached
to its first byte. msgpack keeps ints (64-bit flags, inode keys), str, bytes, maps; tuples come
back as lists.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import structlog

from converter.format.errors import FailedPreconditionError

log = structlog.get_logger(__name__)

MAGIC = b"PPFD"
VERSION = 1
HEADER = struct.Struct("!4sHI")
MAX_STATE_BYTES = 64 << 20  # an inode table of millions of entries fits; a hostile length does not
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class HandoverError(FailedPreconditionError):
    """The session could not be handed over (timeout, refused peer, garbage on the socket)."""


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel recorded it at connect time."""
    pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def trusted_uid(uid: int) -> bool:
    return uid in (0, os.geteuid())


def listen(sock_path: Path) -> socket.socket:
    """A listening unix socket at `sock_path`, mode 0600; a stale socket there is replaced, a live
    one or anything else is refused."""
    sock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        mode = sock_path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise HandoverError(f"{sock_path} exists and is not a socket; refusing to replace it")
        if _listening(sock_path):
            raise HandoverError(f"another process listens on {sock_path}; refusing to take its socket")
        sock_path.unlink()
    # bound and listening under a temporary name, then renamed into place: the path never names a
    # socket that refuses connections (a peer that sees it may connect at once), nor one of mode != 0600
    staging = sock_path.with_name(f".{sock_path.name}.{os.getpid()}.new")
    staging.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(staging))
        os.chmod(staging, 0o600)
        listener.listen(8)
        os.rename(staging, sock_path)
    except BaseException:
        listener.close()
        staging.unlink(missing_ok=True)
        raise
    return listener


def connect(sock_path: Path, timeout_s: float) -> socket.socket:
    """A connection to a trusted listener at `sock_path`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(sock_path))
        pid, uid = peer_uid(sock)
        if not trusted_uid(uid):
            raise HandoverError(f"{sock_path} is served by uid {uid} (pid {pid}), not by this user or root")
    except OSError as exc:
        sock.close()
        raise HandoverError(f"cannot connect to {sock_path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def send_frame(sock: socket.socket, body: dict[str, Any], fd: int | None = None) -> None:
    """One frame, `fd` (if any) attached; the OSError of a broken connection is the caller's to map."""
    payload = msgpack.packb(body, use_bin_type=True)
    if len(payload) > MAX_STATE_BYTES:
        raise HandoverError(f"handover state of {len(payload)} bytes is over the {MAX_STATE_BYTES}-byte cap")
    data = HEADER.pack(MAGIC, VERSION, len(payload)) + payload
    sent = socket.send_fds(sock, [data], [fd]) if fd is not None else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def exchange(sock: socket.socket, body: dict[str, Any], fd: int | None, deadline: float,
             where: Path) -> tuple[dict[str, Any], int | None]:
    """Send a request frame and read the reply frame; a broken connection is a HandoverError."""
    try:
        send_frame(sock, body, fd)
    except OSError as exc:
        raise HandoverError(f"{where} closed the connection: {exc.strerror or exc}") from None
    return recv_frame(sock, deadline)


def recv_frame(sock: socket.socket, deadline: float) -> tuple[dict[str, Any], int | None]:
    """One frame and the fd attached to it (if any); HandoverError on a timeout or garbage. The
    caller owns the fd."""
    fds: list[int] = []
    try:
        head = bytearray()
        while len(head) < HEADER.size:
            sock.settimeout(_remaining(deadline))
            chunk, got, _, _ = socket.recv_fds(sock, HEADER.size - len(head), 2, socket.MSG_CMSG_CLOEXEC)
            fds += got
            if not chunk:
                raise HandoverError("the peer closed the connection before a whole frame")
            head += chunk
        magic, version, length = HEADER.unpack(head)
        if magic != MAGIC:
            raise HandoverError("not a peerpull handover frame (bad magic)")
        if version != VERSION:
            raise HandoverError(f"handover frame version {version} is not understood here (this peerpull speaks "
                                f"{VERSION}): run the same version on both ends")
        if length > MAX_STATE_BYTES:
            raise HandoverError(f"handover frame of {length} bytes is over the {MAX_STATE_BYTES}-byte cap")
        if len(fds) > 1:
            raise HandoverError(f"a handover frame carries at most one fd, got {len(fds)}")
        payload = bytearray()
        while len(payload) < length:
            sock.settimeout(_remaining(deadline))
            chunk = sock.recv(min(length - len(payload), 1 << 20))
            if not chunk:
                raise HandoverError("the peer closed the connection in the middle of a frame")
            payload += chunk
        try:
            # int keys allowed: a session's tables are keyed by inode (only trusted peers get this far)
            body = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise HandoverError(f"handover frame is not valid msgpack: {exc}") from None
        if not isinstance(body, dict):
            raise HandoverError("handover frame body is not a map")
    except TimeoutError:
        _close_all(fds)
        raise HandoverError("timed out waiting for the rest of a handover frame") from None
    except OSError as exc:
        _close_all(fds)
        raise HandoverError(f"the peer's connection failed: {exc.strerror or exc}") from None
    except BaseException:
        _close_all(fds)
        raise
    return body, (fds[0] if fds else None)


def send_session(sock_path: Path, fd: int, state: dict[str, Any], timeout_s: float = 10.0) -> None:
    """Give the session (`fd`, `state`) to the successor listening at `sock_path`; returns once it
    acknowledged (the caller may then exit without unmounting). `fd` stays open here."""
    deadline = time.monotonic() + timeout_s
    with connect(sock_path, timeout_s) as sock:
        reply, extra = exchange(sock, {"kind": "session", "state": state}, fd, deadline, sock_path)
        _close_all([extra] if extra is not None else [])
        if reply.get("kind") != "ack":
            raise HandoverError(f"the successor at {sock_path} refused the session: {reply.get('error', reply)}")
    log.info("session_handed_over", socket=str(sock_path), fd=fd)


def receive_session(sock_path: Path, timeout_s: float) -> tuple[int, dict[str, Any]]:
    """Listen at `sock_path` until a trusted process hands over a session; (fd, state). Refused or
    garbled senders are logged and waited past; HandoverError once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    with listen(sock_path) as listener:
        try:
            while True:
                try:
                    listener.settimeout(_remaining(deadline))
                    conn, _ = listener.accept()
                except TimeoutError:
                    raise HandoverError(f"no session handed over on {sock_path} within {timeout_s:g} s") from None
                with conn:
                    received = _take_session(conn, deadline)
                    if received is not None:
                        return received
        finally:
            sock_path.unlink(missing_ok=True)


def _take_session(conn: socket.socket, deadline: float) -> tuple[int, dict[str, Any]] | None:
    pid, uid = peer_uid(conn)
    if not trusted_uid(uid):
        log.warning("handover_refused", pid=pid, uid=uid, reason="not this user or root")
        return None
    try:
        conn.settimeout(_remaining(min(deadline, time.monotonic() + 5.0)))
        if not conn.recv(1, socket.MSG_PEEK):
            return None  # connected and closed without a byte: a probe (is a successor listening?)
    except (TimeoutError, OSError):
        pass  # recv_frame says what went wrong
    try:
        body, fd = recv_frame(conn, min(deadline, time.monotonic() + 5.0))
    except HandoverError as exc:
        _refuse(conn, pid, uid, str(exc))
        return None
    state = body.get("state")
    if fd is None or body.get("kind") != "session" or not isinstance(state, dict):
        _close_all([fd] if fd is not None else [])
        _refuse(conn, pid, uid, "not a session frame with one fd")
        return None
    try:
        send_frame(conn, {"kind": "ack"})
    except OSError as exc:  # the sender went away: it may not know we have it, so it may still serve
        os.close(fd)
        log.warning("handover_refused", pid=pid, uid=uid, reason=f"could not acknowledge: {exc}")
        return None
    log.info("session_received", pid=pid, uid=uid, fd=fd)
    return fd, state


def _refuse(conn: socket.socket, pid: int, uid: int, reason: str) -> None:
    """Log why, and tell a trusted peer (say, a daemon of another version) before closing."""
    log.warning("handover_refused", pid=pid, uid=uid, reason=reason)
    try:
        send_frame(conn, {"kind": "error", "error": reason})
    except OSError:
        pass


def _listening(sock_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(sock_path))
        except OSError:  # ECONNREFUSED: nobody behind it (a crash left it); or no right to ask
            return False
        return True


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
