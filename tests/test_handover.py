"""Handing a session fd and its state to another process over a unix socket (SCM_RIGHTS): the fd
works end to end in the receiver, the state arrives intact, and nobody but this user or root can
inject a session or take one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from snapshotter.fs.handover import (
    HEADER,
    MAGIC,
    MAX_STATE_BYTES,
    VERSION,
    HandoverError,
    receive_session,
    recv_frame,
    send_frame,
    send_session,
)
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
# the other uid cannot reach the virtualenv (under /root); its children need only the standard library
SYSTEM_PYTHON = "/usr/bin/python3"
# the shapes of a kernel session's state: INIT ints, lookups and open handles keyed by inode
STATE = {"init": {"major": 7, "minor": 45, "flags": (1 << 63) | (1 << 41) | 1, "max_write": 1 << 20, "max_pages": 256},
         "lookups": {1: 3, (1 << 40) + 5: 1}, "handles": {17: [2, 3], 18: [1, 0]}, "names": {"a": b"\x00\xff"}}


class Receiver:
    """receive_session in a thread: its result or its error."""

    def __init__(self, sock_path: Path, timeout_s: float) -> None:
        self.result: tuple[int, dict[str, Any]] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(sock_path, timeout_s), daemon=True)
        self._thread.start()
        wait_until(lambda: sock_path.exists() or not self._thread.is_alive(), 10, "the receiver's socket")

    def _run(self, sock_path: Path, timeout_s: float) -> None:
        try:
            self.result = receive_session(sock_path, timeout_s)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive()


SENDER = """
    import os, sys
    from pathlib import Path
    import msgpack
    from snapshotter.fs.handover import send_session
    r, w = os.pipe()
    send_session(Path(sys.argv[1]), r, msgpack.unpackb(bytes.fromhex(sys.argv[2]), raw=False, strict_map_key=False))
    os.close(r)  # the receiver has its own copy now
    os.write(w, sys.argv[3].encode())
    os.close(w)
"""


def send_from_child(sock_path: Path, state: dict[str, Any], message: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(SENDER), str(sock_path),
                           msgpack.packb(state, use_bin_type=True).hex(), message],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 4096):
        out += chunk
    return out


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "handover.sock"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is private to this user)."""
    path = Path(tempfile.mkdtemp(prefix="peerpull-handover-"))
    path.chmod(0o777)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("running a child as another uid needs root")


def test_a_pipe_fd_and_its_state_move_to_another_process(sock_path: Path) -> None:
    receiver = Receiver(sock_path, timeout_s=30)
    assert sock_path.stat().st_mode & 0o777 == 0o600
    sent = send_from_child(sock_path, STATE, "served by the successor")
    assert sent.returncode == 0, sent.stderr
    receiver.join()
    assert receiver.error is None and receiver.result is not None
    fd, state = receiver.result
    try:
        assert state == STATE
        assert read_all(fd) == b"served by the successor"  # written after the sender let go of its copy
    finally:
        os.close(fd)
    assert not sock_path.exists()  # the receiver cleans up its socket


def test_no_sender_is_a_one_line_timeout(sock_path: Path) -> None:
    with pytest.raises(HandoverError, match=r"no session handed over on .* within 0.2 s") as err:
        receive_session(sock_path, 0.2)
    assert "\n" not in str(err.value)


def test_a_file_in_the_way_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "handover.sock"
    path.write_text("precious")
    with pytest.raises(HandoverError, match="not a socket"):
        receive_session(path, 0.2)
    assert path.read_text() == "precious"


HOSTILE = """
    import os, socket, sys
    print(os.getuid(), flush=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[1])
    except OSError as exc:
        print("connect failed:", exc.strerror)
        sys.exit(0)
    r, w = os.pipe()
    s.settimeout(20)
    try:
        socket.send_fds(s, [bytes.fromhex(sys.argv[2])], [r])
        print("reply:", s.recv(100).hex() or "closed")
    except (BrokenPipeError, ConnectionResetError):  # closed before or after our frame, unread
        print("reply: closed")
"""


def session_frame(state: dict[str, Any]) -> bytes:
    body = msgpack.packb({"kind": "session", "state": state}, use_bin_type=True)
    return HEADER.pack(MAGIC, VERSION, len(body)) + body


def run_hostile(sock_path: Path) -> str:
    result = subprocess.run([SYSTEM_PYTHON, "-c", textwrap.dedent(HOSTILE), str(sock_path),
                             session_frame({"evil": 1}).hex()],
                            capture_output=True, text=True, timeout=60, user=NOBODY, group=NOBODY, cwd="/")
    assert result.returncode == 0, result.stderr
    uid, outcome = result.stdout.splitlines()
    assert uid == str(NOBODY)
    return outcome


def test_another_uid_cannot_inject_a_session(shared_dir: Path) -> None:
    needs_root()
    sock_path = shared_dir / "handover.sock"
    receiver = Receiver(sock_path, timeout_s=30)
    # the socket's mode keeps it out
    assert run_hostile(sock_path) == "connect failed: Permission denied"
    # with the mode loosened by mistake, its credentials still do: the connection is closed unanswered
    sock_path.chmod(0o666)
    assert run_hostile(sock_path) == "reply: closed"
    # and the receiver is still waiting for the real session
    sent = send_from_child(sock_path, STATE, "the real one")
    assert sent.returncode == 0, sent.stderr
    receiver.join()
    assert receiver.result is not None
    fd, state = receiver.result
    try:
        assert state == STATE and read_all(fd) == b"the real one"
    finally:
        os.close(fd)


FOREIGN_LISTENER = """
    import socket, sys, time
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1])
    s.listen(1)
    print("listening", flush=True)
    s.settimeout(30)
    conn, _ = s.accept()
    conn.settimeout(30)
    print("got", len(conn.recv(1 << 16)), flush=True)
"""


def test_a_session_is_not_given_to_another_uid(shared_dir: Path) -> None:
    needs_root()
    sock_path = shared_dir / "foreign.sock"
    listener = subprocess.Popen([SYSTEM_PYTHON, "-c", textwrap.dedent(FOREIGN_LISTENER), str(sock_path)],
                                stdout=subprocess.PIPE, text=True, user=NOBODY, group=NOBODY, cwd="/")
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        r, w = os.pipe()
        try:
            with pytest.raises(HandoverError, match=f"served by uid {NOBODY}"):
                send_session(sock_path, r, STATE, timeout_s=10)
        finally:
            os.close(r)
            os.close(w)
        out, _ = listener.communicate(timeout=30)
        assert out.strip() == "got 0"  # it saw the connection close without a byte (or an fd)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()


def test_garbage_is_refused_and_the_real_sender_still_gets_through(sock_path: Path) -> None:
    receiver = Receiver(sock_path, timeout_s=30)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as junk:
        junk.connect(str(sock_path))
        junk.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply, fd = recv_frame(junk, time.monotonic() + 20)  # a trusted peer is told why
        assert reply == {"kind": "error", "error": "not a peerpull handover frame (bad magic)"} and fd is None
    sent = send_from_child(sock_path, {"v": 1}, "ok")
    assert sent.returncode == 0, sent.stderr
    receiver.join()
    assert receiver.result is not None
    os.close(receiver.result[0])


def frame_error(write: Callable[[socket.socket], None]) -> str:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        write(left)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(HandoverError) as err:
            recv_frame(right, deadline=time.monotonic() + 10)
        return str(err.value)


def test_tuples_come_back_as_lists() -> None:
    left, right = socket.socketpair()
    with left, right:
        send_frame(left, {"handles": {17: (2, 3)}})
        assert recv_frame(right, time.monotonic() + 10) == ({"handles": {17: [2, 3]}}, None)


def test_bad_frames_are_one_line_errors() -> None:
    assert "bad magic" in frame_error(lambda s: s.sendall(b"HTTP" + bytes(6)))
    assert "version 2 is not understood" in frame_error(lambda s: s.sendall(HEADER.pack(MAGIC, 2, 0)))
    assert "over the" in frame_error(lambda s: s.sendall(HEADER.pack(MAGIC, VERSION, MAX_STATE_BYTES + 1)))
    assert "in the middle of a frame" in frame_error(lambda s: s.sendall(HEADER.pack(MAGIC, VERSION, 10) + b"ab"))
    assert "not valid msgpack" in frame_error(lambda s: s.sendall(HEADER.pack(MAGIC, VERSION, 1) + b"\xc1"))
    assert "not a map" in frame_error(lambda s: s.sendall(HEADER.pack(MAGIC, VERSION, 1) + b"\x01"))


def test_two_fds_on_one_frame_are_refused_and_closed() -> None:
    pipes = [os.pipe(), os.pipe()]
    try:
        message = frame_error(lambda s: socket.send_fds(s, [session_frame({})], [pipes[0][0], pipes[1][0]]))
        assert "at most one fd" in message
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_state_over_the_cap_is_not_sent() -> None:
    left, right = socket.socketpair()
    with left, right, pytest.raises(HandoverError, match="over the"):
        send_frame(left, {"blob": b"x" * (MAX_STATE_BYTES + 1)})


def test_a_live_socket_is_not_taken_and_a_stale_one_is_replaced(sock_path: Path) -> None:
    receiver = Receiver(sock_path, timeout_s=30)
    with pytest.raises(HandoverError, match="another process listens"):
        receive_session(sock_path, 0.2)
    sent = send_from_child(sock_path, {"v": 1}, "first")  # the first receiver was not disturbed
    assert sent.returncode == 0, sent.stderr
    receiver.join()
    assert receiver.result is not None
    os.close(receiver.result[0])
    # a socket left by a crash: bound, nobody listening
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(sock_path))
    left.close()
    with pytest.raises(HandoverError, match="no session handed over"):
        receive_session(sock_path, 0.2)
