"""The fd holder keeps a connection fd across the death of the process that gave it: a detached
process of its own that holds the fd and nothing else, hands copies to a successor, and goes
away once the connection ends. A pipe stands for the FUSE connection: this test process holds
the write end (the kernel's side), the holder and the daemons the read end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import structlog

from snapshotter.fs.fd_holder import holder_drop, holder_get, holder_ping, holder_put, holder_stop, spawn_holder
from snapshotter.fs.handover import HEADER, MAGIC, VERSION, HandoverError
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
STATE = {"major": 7, "minor": 45, "flags": (1 << 63) | 1, "max_write": 1 << 20}


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie left for a reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def fds_of(pid: int) -> dict[int, str]:
    base = Path(f"/proc/{pid}/fd")
    return {int(p.name): os.readlink(p) for p in base.iterdir()}


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    sock = tmp_path / "run" / "fd-holder.sock"
    pid = spawn_holder(sock, log_path=tmp_path / "holder.log", systemd=False)
    yield sock, pid
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 10, "the holder to end")


DAEMON = """
    import os, sys, time
    from pathlib import Path
    from snapshotter.fs.fd_holder import holder_get, holder_put
    sock, role = Path(sys.argv[1]), sys.argv[2]
    if role == "first":
        holder_put(sock, int(sys.argv[3]), {"major": 7, "minor": 45, "flags": (1 << 63) | 1, "max_write": 1 << 20})
        print("put", flush=True)
        time.sleep(600)  # serving, until killed
    else:
        fd, state = holder_get(sock)
        print(state["minor"], os.read(fd, 100).decode(), flush=True)
"""


def test_the_connection_outlives_a_killed_daemon_and_goes_to_its_successor(holder: tuple[Path, int]) -> None:
    sock, pid = holder
    # its own session and process group: a signal to the daemon's group does not reach it
    assert os.getsid(pid) != os.getsid(0) and os.getpgid(pid) != os.getpgid(0)
    r, w = os.pipe()
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DAEMON), str(sock), "first", str(r)],
                             pass_fds=[r], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    os.close(r)  # from now on only the daemon and the holder have the read end
    assert first.stdout is not None and first.stdout.readline().strip() == "put"
    first.kill()
    first.wait()
    first.stdout.close()
    assert alive(pid)
    # the "kernel" side still has a reader: this would be EPIPE if the holder had let go
    os.write(w, b"still connected")
    successor = subprocess.run([sys.executable, "-c", textwrap.dedent(DAEMON), str(sock), "second"],
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert successor.returncode == 0, successor.stderr
    assert successor.stdout.split(maxsplit=1) == ["45", "still connected\n"]
    # the holder still holds it after a get; when the connection ends, it leaves
    assert holder_ping(sock) == pid
    os.close(w)
    wait_until(lambda: not alive(pid), 10, "the holder to notice the connection is gone")
    assert not sock.exists()
    assert "fd_holder_connection_gone" in (sock.parent.parent / "holder.log").read_text()


def test_it_holds_the_fd_and_nothing_else(holder: tuple[Path, int]) -> None:
    sock, pid = holder
    # stdin, stdout, stderr and its socket, once the ping that spawn_holder made is closed
    wait_until(lambda: set(fds_of(pid)) == {0, 1, 2, 3}, 10, "the holder to have only its own fds")
    quiet = fds_of(pid)
    assert quiet[0] == "/dev/null" and quiet[3].startswith("socket:")
    r, w = os.pipe()
    try:
        holder_put(sock, r, STATE)
        pipe = os.readlink(f"/proc/self/fd/{r}")
        # the pipe, and nothing more, once it has closed the connection the put came on
        wait_until(lambda: [t for fd, t in fds_of(pid).items() if fd not in quiet] == [pipe], 10,
                   "the holder to keep only the pipe")
    finally:
        os.close(r)
        os.close(w)


def test_put_replaces_drop_forgets_and_get_copies(holder: tuple[Path, int]) -> None:
    sock, pid = holder
    assert holder_get(sock) is None
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        holder_put(sock, r1, {"n": 1})
        holder_put(sock, r2, {"n": 2})
        os.close(r1)
        os.close(r2)
        r1 = r2 = -1
        # the first connection's read end is gone everywhere: the holder closed its copy on the replace
        with pytest.raises(BrokenPipeError):
            os.write(w1, b"x")
        got = holder_get(sock)
        assert got is not None and got[1] == {"n": 2}
        os.write(w2, b"second")
        assert os.read(got[0], 100) == b"second"
        os.close(got[0])
        holder_drop(sock)
        assert holder_get(sock) is None
        with pytest.raises(BrokenPipeError):
            os.write(w2, b"x")
        assert alive(pid)  # a drop is not a stop
    finally:
        for fd in (r1, r2, w1, w2):
            if fd >= 0:
                os.close(fd)


def test_stop_and_sigterm_end_it_and_remove_the_socket(holder: tuple[Path, int], tmp_path: Path) -> None:
    sock, pid = holder
    assert spawn_holder(sock, systemd=False) == pid  # one answers already: no second holder
    holder_stop(sock)
    wait_until(lambda: not alive(pid), 10, "the holder to stop")
    assert not sock.exists() and holder_ping(sock) is None
    with pytest.raises(HandoverError, match="cannot connect"):
        holder_get(sock)
    pid = spawn_holder(sock, systemd=False)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), 10, "the holder to end on SIGTERM")
    assert not sock.exists()


NOBODY_GET = """
    import socket, struct, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    try:
        s.connect(sys.argv[1])
        s.sendall(bytes.fromhex(sys.argv[2]))
        msg, fds, _, _ = socket.recv_fds(s, 1 << 16, 1)
        print("got", len(msg), "bytes", len(fds), "fds")
    except OSError as exc:
        print("refused:", exc.strerror)
"""


def test_another_uid_gets_nothing() -> None:
    if os.geteuid() != 0:
        pytest.skip("running a child as another uid needs root")
    shared = Path(tempfile.mkdtemp(prefix="peerpull-holder-"))  # pytest's tmp_path is private to root
    shared.chmod(0o755)
    sock = shared / "fd-holder.sock"
    pid = spawn_holder(sock, systemd=False)
    r, w = os.pipe()
    try:
        holder_put(sock, r, STATE)
        body = msgpack.packb({"op": "get"})
        frame = (HEADER.pack(MAGIC, VERSION, len(body)) + body).hex()

        def get_as_nobody() -> str:
            result = subprocess.run(["/usr/bin/python3", "-c", textwrap.dedent(NOBODY_GET), str(sock), frame],
                                    capture_output=True, text=True, timeout=60, user=65534, group=65534, cwd="/")
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        assert get_as_nobody() == "refused: Permission denied"  # the socket's mode
        sock.chmod(0o666)  # loosened by mistake: its credentials still get it nothing
        assert get_as_nobody() in ("got 0 bytes 0 fds", "refused: Connection reset by peer",
                                   "refused: Broken pipe")
        got = holder_get(sock)  # still held for the real successor
        assert got is not None
        os.close(got[0])
    finally:
        try:
            holder_stop(sock)  # before the pipe closes: that would end the holder by itself
            wait_until(lambda: not alive(pid), 10, "the holder to stop")
        finally:
            os.close(r)
            os.close(w)
            shutil.rmtree(shared, ignore_errors=True)


def test_the_cli_runs_the_holder(tmp_path: Path) -> None:
    sock = tmp_path / "cli.sock"
    proc = subprocess.Popen([sys.executable, "-m", "peerpull", "fd-holder", "--socket", str(sock)],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_until(lambda: holder_ping(sock) is not None or proc.poll() is not None, 30, "the holder's socket")
        assert holder_ping(sock) == proc.pid  # exec'd in place: a unit's main pid stays the holder
        holder_stop(sock)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None and "fd_holder_stopped" in proc.stderr.read()


def test_a_connection_already_gone_ends_the_holder(tmp_path: Path) -> None:
    sock = tmp_path / "gone.sock"
    pid = spawn_holder(sock, systemd=False)
    r, w = os.pipe()
    os.close(w)
    try:
        holder_put(sock, r, STATE)  # answered before it looks at the fd again
    finally:
        os.close(r)
    wait_until(lambda: not alive(pid), 10, "the holder to notice the hang-up")
    assert not sock.exists()


FUSE_INIT = 26  # opcode, include/uapi/linux/fuse.h
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4

GIVER = """
    import ctypes, os, sys, time
    from pathlib import Path
    from snapshotter.fs.fd_holder import holder_put
    sock, target = Path(sys.argv[1]), sys.argv[2]
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"peerpull-test", target.encode(), b"fuse.peerpull-test", int(sys.argv[3]), opts) != 0:
        sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")
    holder_put(sock, fd, {"major": 7, "minor": 45})
    print("mounted", flush=True)
    time.sleep(600)  # a daemon that never answers INIT, until killed
"""


def mounted(target: Path) -> bool:
    return any(line.split()[4] == str(target) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_a_real_fuse_connection_outlives_its_daemon_until_unmounted(holder: tuple[Path, int], tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("mounting FUSE needs root and /dev/fuse")
    sock, pid = holder
    target = tmp_path / "mnt"
    target.mkdir()
    giver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(GIVER), str(sock), str(target),
                              str(MS_RDONLY | MS_NOSUID | MS_NODEV)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert giver.stdout is not None and giver.stdout.readline().strip() == "mounted", giver.communicate()
        giver.kill()
        giver.wait()
        giver.stdout.close()
        # the daemon is gone; the connection is not: the successor reads the request it left unanswered
        assert mounted(target) and alive(pid)
        got = holder_get(sock)
        assert got is not None and got[1] == {"major": 7, "minor": 45}
        try:
            request = os.read(got[0], (1 << 20) + 4096)
        finally:
            os.close(got[0])
        length, opcode = int.from_bytes(request[0:4], "little"), int.from_bytes(request[4:8], "little")
        assert opcode == FUSE_INIT and length == len(request)
    finally:
        if giver.poll() is None:
            giver.kill()
            giver.wait()
        if mounted(target):
            subprocess.run(["umount", "-l", str(target)], check=True)
    # unmounted: the connection is aborted (POLLERR on /dev/fuse) and the holder has nothing to keep
    wait_until(lambda: not alive(pid), 10, "the holder to notice the unmount")
    assert not sock.exists()


def test_asked_for_a_scope_it_gets_one_or_starts_detached_all_the_same(tmp_path: Path) -> None:
    sock = tmp_path / "scoped.sock"
    with structlog.testing.capture_logs() as logs:
        pid = spawn_holder(sock, systemd=True)
    try:
        assert holder_ping(sock) == pid and os.getsid(pid) != os.getsid(0)
        warned = [e["event"] for e in logs if e["log_level"] == "warning"]
        systemd_runs = Path("/run/systemd/system").is_dir() and shutil.which("systemd-run") is not None
        if systemd_runs:  # a scope of its own: outside this process's cgroup
            assert warned == [] and Path(f"/proc/{pid}/cgroup").read_text() != Path("/proc/self/cgroup").read_text()
        else:  # no systemd to ask (a container): it says what that costs, and runs detached
            assert warned == ["fd_holder_scope_failed"]
    finally:
        holder_stop(sock)
        wait_until(lambda: not alive(pid), 10, "the holder to stop")


def test_a_put_without_an_fd_is_refused(holder: tuple[Path, int]) -> None:
    sock, pid = holder
    from snapshotter.fs.fd_holder import _request

    with pytest.raises(HandoverError, match="a put carries one fd"):
        _request(sock, {"op": "put", "state": {}}, None, 10)
    with pytest.raises(HandoverError, match="unknown request 'steal'"):
        _request(sock, {"op": "steal"}, None, 10)
    assert holder_get(sock) is None and alive(pid)
