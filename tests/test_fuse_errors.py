"""The FUSE seam: every handler of the layer filesystem answers with an errno, never a hang.

A real FUSE mount per case (a LayerFS in its own process, see tests/support/failing_fuse.py) has a
RuntimeError injected into one handler; the syscall that reaches that handler must fail with
EIO. Every case runs over both transports (pyfuse3 and peerpull's own kernel session). The syscall runs in a thread joined with a bound: if it hangs, the server is killed (which
aborts the connection and frees the syscall) and the test fails.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from snapshotter.fs.fusefs import OPERATIONS, LayerFS
from snapshotter.fs.guard import GUARD_MARK, FsError, errno_for, fuse_handler
from snapshotter.fs.mount import mounted_at
from snapshotter.fs.pyfuse3_ops import Pyfuse3Operations
from tests.support.failing_fuse import LAYER_DIR

REPO = Path(__file__).resolve().parent.parent
HANG_BOUND_S = 60.0  # a guard against a hang, not a timing assertion

Syscall = Callable[[Path], object]


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 5)
    finally:
        os.close(fd)


def _open(path: Path) -> None:
    os.close(os.open(path, os.O_RDONLY))


# op → the syscall whose request reaches that handler (earlier handlers on the path succeed)
CASES: dict[str, Syscall] = {
    "getattr": lambda m: os.stat(m),
    "lookup": lambda m: os.stat(m / LAYER_DIR / "d" / "f"),
    "readlink": lambda m: os.readlink(m / LAYER_DIR / "l"),
    "opendir": lambda m: os.listdir(m / LAYER_DIR / "d"),
    "readdir": lambda m: os.listdir(m / LAYER_DIR / "d"),
    "open": lambda m: _open(m / LAYER_DIR / "d" / "f"),
    "read": lambda m: _read(m / LAYER_DIR / "d" / "f"),
    "getxattr": lambda m: os.getxattr(m / LAYER_DIR / "d" / "f", "user.k"),
    "listxattr": lambda m: os.listxattr(m / LAYER_DIR / "d" / "f"),
    "statfs": lambda m: os.statvfs(m),
}


class Mounted:
    def __init__(self, mountpoint: Path, op: str, backend: str) -> None:
        self.mountpoint = mountpoint
        self.process = subprocess.Popen([sys.executable, "-m", "tests.support.failing_fuse", str(mountpoint), op,
                                         backend],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # EOF if the server failed to mount
        if line.strip() != "ready":
            self.process.kill()
            self.process.wait(timeout=HANG_BOUND_S)
            raise AssertionError(f"the FUSE server did not mount: {self.process.stderr.read()}")  # type: ignore[union-attr]

    def call(self, syscall: Syscall) -> BaseException | None:
        """The exception the syscall raised (None if it succeeded); fails the test if it hangs."""
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                syscall(self.mountpoint)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(HANG_BOUND_S)
        if thread.is_alive():
            self.process.kill()  # aborts the FUSE connection: the hung syscall returns ENOTCONN
            thread.join(HANG_BOUND_S)
            pytest.fail("the syscall hung: its FUSE handler let an exception escape")
        return outcome[0]

    def close(self) -> str:
        self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=HANG_BOUND_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if mounted_at(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        return err


@pytest.fixture
def mount(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    opened: list[Mounted] = []

    def start(op: str, backend: str) -> Mounted:
        point = tmp_path / f"mnt-{op}-{backend}"
        point.mkdir()
        opened.append(Mounted(point, op, backend))
        return opened[-1]

    yield start
    for m in opened:
        m.close()


pytestmark = pytest.mark.root
BACKENDS = ("pyfuse3", "kernel")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(CASES))
def test_failure_in_handler_is_eio_not_a_hang(mount, op: str, backend: str) -> None:  # type: ignore[no-untyped-def]
    served = mount(op, backend)
    exc = served.call(CASES[op])
    assert isinstance(exc, OSError), f"{op}: expected an errno, got {exc!r}"
    assert exc.errno == errno.EIO, f"{op}: {exc!r}"
    events = [json.loads(line) for line in served.close().splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "fuse_handler_failed"]
    # one event per failed request (the kernel may send a read twice), each naming the op
    assert failed and all(e["op"] == op and e["errno"] == "EIO" for e in failed), failed
    assert f"injected into {op}" in failed[0]["error"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_injection_every_syscall_succeeds(mount, backend: str) -> None:  # type: ignore[no-untyped-def]
    served = mount("none", backend)
    for op, syscall in CASES.items():
        if op == "read":
            continue  # needs a chunk fetcher; the failing server has none
        assert served.call(syscall) is None, op
    assert "fuse_handler_failed" not in served.close()


def test_every_operation_of_layerfs_and_every_pyfuse3_handler_is_guarded() -> None:
    unguarded = sorted(name for name in OPERATIONS if not getattr(vars(LayerFS)[name], GUARD_MARK, False))
    assert unguarded == []
    import pyfuse3

    handlers = {name for name, value in vars(pyfuse3.Operations).items()
                if callable(value) and not name.startswith("_")} & set(vars(Pyfuse3Operations))
    assert {"lookup", "getattr", "readlink", "opendir", "readdir", "releasedir", "open", "read", "release",
            "getxattr", "listxattr", "statfs", "forget", "access"} <= handlers
    assert sorted(name for name in handlers if not getattr(vars(Pyfuse3Operations)[name], GUARD_MARK, False)) == []


async def test_guard_passes_fs_errors_and_maps_the_rest() -> None:
    @fuse_handler
    def lookup(self: object, inode: int) -> None:
        raise FsError(errno.ENOENT)

    @fuse_handler
    async def getattr(self: object, inode: int) -> None:
        raise RuntimeError("boom")

    with structlog.testing.capture_logs() as logs:
        with pytest.raises(FsError) as passed:
            lookup(None, 5)
        with pytest.raises(FsError) as mapped:
            await getattr(None, 7)
    assert passed.value.errno == errno.ENOENT
    assert mapped.value.errno == errno.EIO
    assert [(e["event"], e["op"], e["args"]) for e in logs] == [("fuse_handler_failed", "getattr", [7])]


def test_errno_for() -> None:
    assert errno_for(RuntimeError()) == errno.EIO
    assert errno_for(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert errno_for(NotImplementedError()) == errno.ENOSYS
    assert errno_for(MemoryError()) == errno.ENOMEM
    assert errno_for(FsError(errno.ENOTDIR)) == errno.ENOTDIR
