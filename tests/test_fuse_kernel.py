"""peerpull's own FUSE session (snapshotter/fs/kernel), where it differs from pyfuse3: the protocol
corners a kernel rarely sends are driven over a SEQPACKET socket pair (one message per request, as
on /dev/fuse: the only way to send an opcode or a size the kernel never would), and a real mount
shows INIT's state, a resumed session serving without INIT, and passthrough reads that never reach
the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.fs.fusefs import LayerFS
from snapshotter.fs.guard import FsError
from snapshotter.fs.kernel import abi
from snapshotter.fs.kernel.abi import InitFlag, Op
from snapshotter.fs.kernel.session import KernelSession, SessionError
from snapshotter.fs.mount import KernelMount, mounted_at, open_mount
from tests.support.failing_fuse import LAYER_DIR, failing_fs
from tests.support.kernel_fuse import BOUND_S, Scripted, in_thread, mounted, until

STATE = {"major": 7, "minor": 45, "flags": int(InitFlag.ASYNC_READ | InitFlag.DO_READDIRPLUS), "max_write": 1 << 20,
         "max_pages": 256, "max_readahead": 1 << 17, "max_background": 64, "congestion_threshold": 48,
         "time_gran": 1, "max_stack_depth": 0}


class Wire:
    """The kernel's end of a session: requests out, replies in."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)

    async def send(self, opcode: int, unique: int, nodeid: int = abi.ROOT_ID, body: bytes = b"",
                   length: int | None = None) -> None:
        size = abi.IN_HEADER.size + len(body)
        header = abi.IN_HEADER.pack(size if length is None else length, opcode, unique, nodeid, 0, 0, 0, 0, 0)
        await asyncio.get_running_loop().sock_sendall(self.sock, header + body)

    async def reply(self) -> tuple[int, int, bytes]:
        """(unique, errno, payload) of the next reply."""
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 1 << 21), BOUND_S)
        length, error, unique = abi.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return unique, -error, data[abi.OUT_HEADER.size:]


@contextlib.asynccontextmanager
async def wired(fs: LayerFS) -> AsyncIterator[tuple[Wire, KernelSession]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    session = KernelSession.resume(fs, ours.fileno(), STATE, max_tasks=8)
    serving = asyncio.create_task(session.serve())
    try:
        yield Wire(theirs), session
    finally:
        theirs.close()  # the session reads end-of-file: the "connection" is gone
        assert await asyncio.wait_for(serving, BOUND_S) == "unmounted"
        ours.close()


async def test_unknown_and_write_opcodes_get_enosys_and_erofs_and_forget_gets_no_reply() -> None:
    async with wired(failing_fs("none")) as (wire, _):
        await wire.send(4095, 1)  # no such opcode
        assert (await wire.reply())[:2] == (1, errno.ENOSYS)
        await wire.send(Op.MKDIR, 2, body=struct.pack("<II", 0o755, 0) + b"x\0")
        assert (await wire.reply())[:2] == (2, errno.EROFS)
        await wire.send(Op.FORGET, 3, body=abi.FORGET_IN.pack(1))
        await wire.send(Op.BATCH_FORGET, 4, body=abi.BATCH_FORGET_IN.pack(1, 0) + abi.FORGET_ONE.pack(5, 1))
        await wire.send(Op.STATX, 5, body=bytes(24))
        assert (await wire.reply())[:2] == (5, errno.ENOSYS)  # the forgets answered nothing


async def test_bad_request_sizes_are_eio_not_a_crash() -> None:
    async with wired(failing_fs("none")) as (wire, session):
        await wire.send(Op.GETATTR, 1, length=999)  # the header's length is not what was read
        assert (await wire.reply())[:2] == (1, errno.EIO)
        await wire.send(Op.READ, 2, body=b"\0" * 8)  # a READ body shorter than fuse_read_in
        assert (await wire.reply())[:2] == (2, errno.EIO)
        await wire.send(Op.LOOKUP, 3, body=b"no-terminating-nul")
        assert (await wire.reply())[:2] == (3, errno.EIO)
        await wire.send(Op.GETXATTR, 4, body=b"\0\0")
        assert (await wire.reply())[:2] == (4, errno.EIO)
        await asyncio.get_running_loop().sock_sendall(wire.sock, b"\0" * 7)  # not even a header: nothing to answer
        await wire.send(Op.GETATTR, 5)  # and the session still serves
        unique, code, payload = await wire.reply()
        assert (unique, code, len(payload)) == (5, 0, abi.ATTR_OUT_SIZE)
        assert session.requests == 6


async def test_interrupt_of_a_stalled_read_answers_eintr() -> None:
    fs = Scripted(stall=True)
    async with wired(fs) as (wire, session):
        ino = fs.lookup(fs.lookup(fs.lookup(abi.ROOT_ID, LAYER_DIR.encode()).ino, b"d").ino, b"f").ino
        await wire.send(Op.READ, 10, nodeid=ino, body=abi.READ_IN.pack(ino, 0, 4096, 0, 0, 0, 0))
        await wire.send(Op.GETATTR, 11)  # the stalled read does not hold up other requests
        assert (await wire.reply())[:2] == (11, 0)
        await wire.send(Op.INTERRUPT, 12, body=abi.INTERRUPT_IN.pack(10))
        assert (await wire.reply())[:2] == (10, errno.EINTR)
        await wire.send(Op.INTERRUPT, 13, body=abi.INTERRUPT_IN.pack(10))  # answered already: ignored
        await wire.send(Op.GETATTR, 14)
        assert (await wire.reply())[:2] == (14, 0)  # no reply to either INTERRUPT came before it
        assert session.reads == 1


async def test_interrupt_read_with_its_read_in_one_batch_still_answers_eintr() -> None:
    fs = Scripted(stall=True)
    async with wired(fs) as (wire, session):
        ino = fs.lookup(fs.lookup(fs.lookup(abi.ROOT_ID, LAYER_DIR.encode()).ino, b"d").ino, b"f").ino
        # both queued before the session reads: its READ task is cancelled before it ever ran
        await wire.send(Op.READ, 20, nodeid=ino, body=abi.READ_IN.pack(ino, 0, 4096, 0, 0, 0, 0))
        await wire.send(Op.INTERRUPT, 21, body=abi.INTERRUPT_IN.pack(20))
        assert (await wire.reply())[:2] == (20, errno.EINTR)
        await wire.send(Op.GETATTR, 22)
        assert (await wire.reply())[:2] == (22, 0)  # one answer for the READ, none for the INTERRUPT
        assert session.interrupts == 1


async def test_reads_beyond_max_tasks_wait_in_the_kernel_queue_then_all_get_answers() -> None:
    fs = Scripted(stall=True)
    async with wired(fs) as (wire, session):  # max_tasks=8
        ino = fs.lookup(fs.lookup(fs.lookup(abi.ROOT_ID, LAYER_DIR.encode()).ino, b"d").ino, b"f").ino
        for unique in range(1, 21):
            await wire.send(Op.READ, unique, nodeid=ino, body=abi.READ_IN.pack(ino, 0, 4096, 0, 0, 0, 0))
        await until(lambda: session.reads == 8)
        await asyncio.sleep(0.1)  # a chance to read more than it may: it must not
        assert session.reads == 8
        fs.gate.set()
        answers = [await wire.reply() for _ in range(20)]
        assert sorted(a[0] for a in answers) == list(range(1, 21))
        assert all(a[1:] == (0, b"hello") for a in answers)


async def test_xattr_size_probe_and_erange() -> None:
    fs = failing_fs("none")
    async with wired(fs) as (wire, _):
        ino = fs.lookup(fs.lookup(fs.lookup(abi.ROOT_ID, LAYER_DIR.encode()).ino, b"d").ino, b"f").ino
        await wire.send(Op.GETXATTR, 1, nodeid=ino, body=abi.GETXATTR_IN.pack(0, 0) + b"user.k\0")
        assert await wire.reply() == (1, 0, abi.GETXATTR_OUT.pack(1, 0))
        await wire.send(Op.GETXATTR, 2, nodeid=ino, body=abi.GETXATTR_IN.pack(64, 0) + b"user.k\0")
        assert await wire.reply() == (2, 0, b"v")
        await wire.send(Op.LISTXATTR, 3, nodeid=ino, body=abi.GETXATTR_IN.pack(3, 0))
        assert (await wire.reply())[:2] == (3, errno.ERANGE)  # "user.k\0" needs 7 bytes
        await wire.send(Op.GETXATTR, 4, nodeid=ino, body=abi.GETXATTR_IN.pack(64, 0) + b"user.none\0")
        assert (await wire.reply())[:2] == (4, errno.ENODATA)


OPCODES = st.sampled_from([op for op in Op if op != Op.DESTROY]) | st.integers(0, 5000)
NODEIDS = st.sampled_from([abi.ROOT_ID, (1 << 32) | 1, (1 << 32) | 2, (1 << 32) | 3]) | st.integers(0, (1 << 64) - 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(OPCODES, NODEIDS, st.binary(max_size=96)), max_size=12))
def test_any_request_gets_a_well_formed_answer_or_none_and_the_session_keeps_serving(
        requests: list[tuple[int, int, bytes]]) -> None:
    async def run() -> None:
        async with wired(Scripted()) as (wire, _):
            for unique, (opcode, nodeid, body) in enumerate(requests, start=1):
                await wire.send(opcode, unique, nodeid=nodeid, body=body)
            marker = len(requests) + 1
            await wire.send(Op.GETATTR, marker)
            while True:
                unique, code, payload = await wire.reply()  # Wire checks each reply's length
                assert 0 <= code < 4096 and (code == 0 or payload == b"")
                assert 1 <= unique <= marker
                if unique == marker:
                    assert code == 0
                    return

    asyncio.run(run())


async def test_features_not_negotiated_are_one_line_errors() -> None:
    async with wired(failing_fs("none")) as (_, session):
        assert not session.passthrough and not session.resend
        for call in (lambda: session.open_backing(0), lambda: session.close_backing(1), session.notify_resend):
            with pytest.raises(SessionError) as refused:
                call()
            assert "\n" not in str(refused.value)


# ---- a real mount ------------------------------------------------------------------------------

def _needs_fuse() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")


@pytest.mark.root
async def test_init_state_and_a_resumed_session_serves_without_init(tmp_path: Path) -> None:
    _needs_fuse()
    fs = failing_fs("none")
    async with mounted(fs, tmp_path / "mnt") as mount:
        first = mount.session
        assert first is not None
        state = first.init_state()
        assert state["major"] == 7 and state["minor"] >= abi.MIN_MINOR
        assert state["max_write"] == 1 << 20 and state["max_pages"] == 256
        assert state["flags"] & InitFlag.ASYNC_READ and not state["flags"] & InitFlag.WRITEBACK_CACHE
        target = tmp_path / "mnt" / LAYER_DIR / "d" / "f"
        assert (await in_thread(os.stat, target)).st_size == 5
        assert first.lookups()  # the kernel holds references to what it looked up
        # a successor takes the same connection from (fd, state): it never sees INIT
        first.stop()
        await asyncio.sleep(0)
        second = KernelSession.resume(fs, first.fd, state, lookups=first.lookups())
        serving = asyncio.create_task(second.serve())
        listing = await in_thread(os.listdir, tmp_path / "mnt" / LAYER_DIR / "d")
        assert listing == ["f"]
        assert await in_thread(os.getxattr, target, "user.k") == b"v"
        assert second.requests > 0
        second.stop()
        await serving


# O_DIRECT: a read through the page cache is a background request the reader waits on killably
# only; a direct read is a request of the reader's own, which a signal interrupts
READER = """
import mmap, os, signal, sys
class Interrupted(Exception):
    pass
def raise_interrupted(signum, frame):
    raise Interrupted()
signal.signal(signal.SIGUSR1, raise_interrupted)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
print("opened", flush=True)
try:
    os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
    print("read", flush=True)
except Interrupted:
    print("interrupted", flush=True)
"""


@pytest.mark.root
async def test_a_signal_to_a_reader_stalled_in_the_daemon_interrupts_its_read(tmp_path: Path) -> None:
    _needs_fuse()
    async with mounted(Scripted(stall=True), tmp_path / "mnt") as mount:
        session = mount.session
        assert session is not None
        target = tmp_path / "mnt" / LAYER_DIR / "d" / "f"
        reader = await asyncio.create_subprocess_exec(sys.executable, "-c", READER, str(target),
                                                      stdout=asyncio.subprocess.PIPE)
        assert reader.stdout is not None
        assert await asyncio.wait_for(reader.stdout.readline(), BOUND_S) == b"opened\n"
        await until(lambda: session.reads > 0)  # its READ is stalled in the daemon
        reader.send_signal(signal.SIGUSR1)  # the kernel sends INTERRUPT for the request it waits on
        out, _ = await asyncio.wait_for(reader.communicate(), BOUND_S)
        assert out == b"interrupted\n"
        assert session.interrupts == 1


@pytest.mark.root
async def test_a_request_left_unanswered_is_resent_to_the_successor(tmp_path: Path) -> None:
    _needs_fuse()
    fs = Scripted(stall=True)
    async with mounted(fs, tmp_path / "mnt") as mount:
        first = mount.session
        assert first is not None
        if not first.resend:
            pytest.skip("this kernel does not resend FUSE requests (6.9+)")
        target = tmp_path / "mnt" / LAYER_DIR / "d" / "f"
        reading = asyncio.create_task(in_thread(Path.read_bytes, target))
        await until(lambda: first.reads > 0)  # its READ is stalled in the first session
        first.stop()  # gone without answering: the kernel still waits for that READ
        await asyncio.sleep(0.1)
        assert not reading.done()
        fs.stall = False
        second = KernelSession.resume(fs, first.fd, first.init_state())
        serving = asyncio.create_task(second.serve())
        second.notify_resend()
        assert await reading == b"hello"
        assert second.reads >= 1
        second.stop()
        await serving


@pytest.mark.root
async def test_a_mount_handed_to_a_successor_keeps_serving_its_open_files(tmp_path: Path) -> None:
    _needs_fuse()
    fs = Scripted()
    point = tmp_path / "mnt"
    point.mkdir()
    first = KernelMount(fs, point, 64, 128)
    first.open()
    serving = asyncio.create_task(first.serve())
    target = point / LAYER_DIR / "d" / "f"
    held = await in_thread(os.open, target, os.O_RDONLY | os.O_DIRECT)  # O_DIRECT: every read is a READ
    buffer = mmap.mmap(-1, 4096)
    try:
        assert await in_thread(os.preadv, held, [buffer], 0) == 5
        await first.stop(serving)
        session = first.detach()
        first.close()  # the predecessor goes; the mount and the connection stay
        assert mounted_at(point) == "fuse.peerpull"
        second = KernelMount.adopt(fs, point, session.fd, session.init_state(), 64, 128, session.lookups(),
                                   session.handles())
        serving = asyncio.create_task(second.serve())
        buffer[:5] = b"....."
        assert await in_thread(os.preadv, held, [buffer], 0) == 5 and buffer[:5] == b"hello"
        assert await in_thread(os.listdir, point / LAYER_DIR) == ["d", "l"]
        assert second.session is not None and second.session.reads == 1
        await in_thread(os.close, held)
        await second.stop(serving)
        second.close()
        assert mounted_at(point) is None
    finally:
        if mounted_at(point):  # a failure above: leave no mount behind
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.root
async def test_a_passthrough_file_reads_without_any_read_request(tmp_path: Path) -> None:
    _needs_fuse()
    fs = Scripted()
    backing = tmp_path / "object"  # on the plain filesystem of the temp dir (not overlayfs)
    backing.write_bytes(b"HELLO")  # not what READ answers: the bytes show who served them
    async with mounted(fs, tmp_path / "mnt") as mount:
        session = mount.session
        assert session is not None
        if not session.passthrough:
            pytest.skip("this kernel does not offer FUSE passthrough (6.9+)")
        target = tmp_path / "mnt" / LAYER_DIR / "d" / "f"
        # without a backing file the read reaches the daemon
        assert await in_thread(Path.read_bytes, target) == b"hello" and session.reads > 0
        await until(lambda: session.handles() == {})  # its RELEASE came: the next open decides anew
        fs.backing = backing
        before = session.reads

        def read_and_map() -> tuple[bytes, bytes]:
            with open(target, "rb") as f:
                data = f.read()
                with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                    return data, bytes(mapped[:5])

        assert await in_thread(read_and_map) == (b"HELLO", b"HELLO")
        assert await in_thread(read_and_map) == (b"HELLO", b"HELLO")  # the backing id is reused / reopened
        # two opens at once share one backing id, released with the last close
        first = await in_thread(open, target, "rb")
        second = await in_thread(open, target, "rb")
        ino = os.fstat(first.fileno()).st_ino
        count, backing_id = session.handles()[ino]
        assert count == 2 and backing_id > 0
        assert await in_thread(first.read) == await in_thread(second.read) == b"HELLO"
        await in_thread(first.close)
        await in_thread(second.close)
        await until(lambda: session.handles() == {})  # every open released, its backing id closed
        # through overlayfs with an upper directory on top, as a container sees it
        merged, upper, work = tmp_path / "merged", tmp_path / "upper", tmp_path / "work"
        for d in (merged, upper, work):
            d.mkdir()
        options = f"lowerdir={tmp_path / 'mnt' / LAYER_DIR},upperdir={upper},workdir={work}"
        # in a thread: overlayfs asks the FUSE mount, which this event loop serves
        await in_thread(lambda: subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                                                check=True))
        try:
            assert await in_thread(Path.read_bytes, merged / "d" / "f") == b"HELLO"
        finally:
            await in_thread(lambda: subprocess.run(["umount", str(merged)], check=True))
        assert session.reads == before


def test_fs_error_carries_its_errno() -> None:
    assert FsError(errno.ENOENT).errno == errno.ENOENT


@pytest.mark.root
def test_open_mount_serves_with_the_configured_backend(tmp_path: Path) -> None:
    _needs_fuse()
    for backend in ("kernel", "pyfuse3", "auto"):
        point = tmp_path / backend
        point.mkdir()
        mount = open_mount(Scripted(), point, backend, 8, 128)
        try:
            # auto: the kernel transport wherever FUSE 7.31 (Linux 5.4) or newer is spoken
            assert mount.backend == ("kernel" if backend == "auto" else backend)
            assert mounted_at(point) == "fuse.peerpull"
        finally:
            mount.close()
        assert mounted_at(point) is None
