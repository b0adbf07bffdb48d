"""Live restart (issue 11): a running container keeps reading while the daemon is handed over
(SIGHUP + --takeover), SIGKILLed and started again (the fd holder keeps the connection), and
SIGKILLed while a read of an unfetched chunk waits on a slow origin (the kernel resends it to the
successor). Real daemon (kernel FUSE transport), containerd + runc, registry; the only fake is a
relay in front of the registry that makes one blob request slow.

Two readers run for the whole module: the container itself (busybox `md5sum -c` over small files
and a cached large one, in a loop, failures to a file), and this process through the container's
root (/proc/PID/root: the container's overlay over the FUSE mount) with every byte compared:
small files, a cached large file with its page cache dropped before each read, random ranges of a
large file served lazily from the origin, and mmap'ed pages. No read may fail; the longest wait
of one read across each restart (the stall) is printed, never asserted on.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from peerpull.live_restart import STATE_VERSION, LiveRestart, export_state
from peerpull.testbed.daemon import EmbeddedDaemon
from peerpull.testbed.registry import EmbeddedRegistry
from snapshotter.config import SnapshotterConfig
from snapshotter.fs.fd_holder import holder_ping, holder_stop
from snapshotter.fs.kernel.session import KernelSession
from snapshotter.fs.mount import KernelMount, mounted_at
from tests.support import images
from tests.support.cli import peerpull_cmd
from tests.support.containerd import NAMESPACE, ContainerdProcess, run_container
from tests.support.fault_proxy import FaultProxy
from tests.support.kernel_fuse import Scripted, in_thread, mounted
from tests.support.lazy_stack import fuse_missing
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]

SMALL = {f"data/small/s{i:02d}.txt": random.Random(i).randbytes(random.Random(i).choice([90, 3000, 20_000, 70_000]))
         for i in range(40)}
CACHED = "data/big/cached.bin"  # read whole by the container each round: served from the node's caches
LAZY = "data/big/lazy.bin"  # random ranges read by this process: fetched from the origin as they come
MAPPED = "data/big/mapped.bin"  # read through mmap
LAZY_SIZE = 32 << 20
RESERVED = 8 << 20  # the last 8 MiB of LAZY: untouched until the slow-origin crash reads it
READ_SIZE = 64 << 10
SLOW_ORIGIN_S = 4.0  # the slow blob request: long enough that the daemon dies while it waits


def _files() -> dict[str, bytes]:
    rnd = random.Random(11)
    files = dict(SMALL)
    files[CACHED] = rnd.randbytes(3 << 20)
    files[LAZY] = rnd.randbytes(LAZY_SIZE)
    files[MAPPED] = rnd.randbytes(6 << 20)
    checked = [*SMALL, CACHED]
    files["check.md5"] = "".join(f"{hashlib.md5(files[n]).hexdigest()}  /{n}\n" for n in checked).encode()
    return files


FILES = _files()
CONTAINER_LOOP = ("n=0; while :; do /bin/busybox md5sum -c /check.md5 >/dev/null 2>>/tmp/errs "
                  "|| echo FAIL >>/tmp/errs; n=$((n+1)); echo $n >/tmp/rounds; done")


class SlowRelay(FaultProxy):
    """The registry, except that the first blob Range request after `POST /_arm` waits
    SLOW_ORIGIN_S (`GET /_delayed` says whether it came). It runs in a process of its own, so that
    nothing of this process's (the readers, the GIL) can hold it up."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._armed = False
        self._delayed = False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/_arm":
            self._armed, self._delayed = True, False
            return web.Response(text="armed")
        if request.path == "/_delayed":
            return web.Response(text="yes" if self._delayed else "no")
        if self._armed and "/blobs/" in request.path and request.headers.get("Range"):
            self._armed, self._delayed = False, True
            await asyncio.sleep(SLOW_ORIGIN_S)
        return await super()._handle(request)


def relay_main(upstream: str, address_file: str) -> None:
    async def serve() -> None:
        relay = await SlowRelay(upstream).start()
        Path(address_file).write_text(relay.address)
        await asyncio.Event().wait()

    asyncio.run(serve())


class RelayProcess:
    def __init__(self, upstream: str, workdir: Path) -> None:
        address_file = workdir / "relay.address"
        code = f"from tests.test_live_restart import relay_main; relay_main({upstream!r}, {str(address_file)!r})"
        with open(workdir / "relay.log", "ab") as log:  # the dead daemons' cut connections are logged there
            self._proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log)
        wait_until(lambda: address_file.exists() and address_file.read_text() != "", 60, "the relay to listen")
        self.address = address_file.read_text()

    def _ask(self, method: str, path: str) -> str:
        request = urllib.request.Request(f"http://{self.address}{path}", method=method)
        with urllib.request.urlopen(request, timeout=10) as resp:
            return str(resp.read().decode())

    def arm(self) -> None:
        self._ask("POST", "/_arm")

    def delayed(self) -> bool:
        return self._ask("GET", "/_delayed") == "yes"

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(30)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class MappedFile:
    """A read-only mapping whose page faults are taken with the GIL released (the copy is a ctypes
    call): a fault that waits for a killed daemon's successor must not stop this process from
    starting that successor, as slicing an `mmap.mmap` (GIL held) would."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if self.addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")

    def read(self, offset: int, length: int) -> bytes:
        buf = ctypes.create_string_buffer(length)
        ctypes.memmove(buf, self.addr + offset, length)
        return buf.raw

    def drop(self, offset: int, length: int) -> None:
        if _libc.madvise(self.addr + offset, length, mmap.MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise failed")

    def close(self) -> None:
        _libc.munmap(self.addr, self.size)


@dataclass
class Reader:
    """Reads through the container's root in a loop, every byte compared with the image."""

    root: Path
    errors: list[str] = field(default_factory=list)
    ops: int = 0
    longest_s: float = 0.0  # the longest single read since the last reset()
    stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, daemon=True, name="restart-reader")
        self._thread.start()
        return self

    def reset(self) -> None:
        self.longest_s = 0.0

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(120)

    def _run(self) -> None:
        rnd = random.Random(5)
        mapped_fd = os.open(self.root / MAPPED, os.O_RDONLY)
        mapped = MappedFile(mapped_fd, len(FILES[MAPPED]))
        lazy_fd = os.open(self.root / LAZY, os.O_RDONLY)  # one handle open across every restart
        try:
            while not self.stop.is_set():
                kind = self.ops % 4
                started = time.monotonic()
                try:
                    if kind == 0:
                        name = rnd.choice(list(SMALL))
                        got = (self.root / name).read_bytes()
                        self._check(name, 0, got)
                    elif kind == 1:
                        self._read_cached(rnd)
                    elif kind == 2:
                        offset = rnd.randrange(0, LAZY_SIZE - RESERVED - READ_SIZE) & ~4095
                        self._check(LAZY, offset, os.pread(lazy_fd, READ_SIZE, offset))
                    else:
                        self._read_mapped(rnd, mapped, mapped_fd)
                except OSError as exc:
                    self.errors.append(f"{kind}: {exc!r}")
                took = time.monotonic() - started
                self.longest_s = max(self.longest_s, took)
                self.ops += 1
        finally:
            mapped.close()
            os.close(mapped_fd)
            os.close(lazy_fd)

    def _read_cached(self, rnd: random.Random) -> None:
        fd = os.open(self.root / CACHED, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # past the page cache: to the daemon
            offset = rnd.randrange(0, len(FILES[CACHED]) - READ_SIZE)
            self._check(CACHED, offset, os.pread(fd, READ_SIZE, offset))
        finally:
            os.close(fd)

    def _read_mapped(self, rnd: random.Random, mapped: MappedFile, fd: int) -> None:
        page = rnd.randrange(0, len(FILES[MAPPED]) // 4096 - 16)
        lo, hi = page * 4096, page * 4096 + 16 * 4096
        mapped.drop(lo, hi - lo)  # unmapped, then out of the page cache:
        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)  # the page faults reach the daemon
        self._check(MAPPED, lo, mapped.read(lo, hi - lo))

    def _check(self, name: str, offset: int, got: bytes) -> None:
        want = FILES[name][offset:offset + len(got)]
        if got != want or (name in SMALL and len(got) != len(FILES[name])):
            self.errors.append(f"{name} at {offset}: {len(got)} bytes differ from the image")


@dataclass
class Node:
    registry: EmbeddedRegistry
    relay: RelayProcess
    daemon: EmbeddedDaemon
    ctrd: ContainerdProcess
    image: str
    container: str
    reader: Reader

    @property
    def holder_socket(self) -> Path:
        return self.daemon.sock_dir / "fd-holder.sock"

    def container_rounds(self) -> int:
        text = (self.reader.root / "tmp" / "rounds").read_text().strip() if (self.reader.root / "tmp" / "rounds").exists() else "0"
        return int(text or 0)

    def container_errors(self) -> str:
        path = self.reader.root / "tmp" / "errs"
        return path.read_text() if path.exists() else ""

    def keeps_reading(self, what: str) -> None:
        """Both readers made progress after `what`, and nothing failed."""
        rounds, ops = self.container_rounds(), self.reader.ops
        wait_until(lambda: self.container_rounds() >= rounds + 2 and self.reader.ops >= ops + 20, 120,
                   f"both readers to go on after {what}")
        assert self.reader.errors == [], f"{what}: {self.reader.errors[:5]}\n{self.daemon.log_tail()}"
        assert self.container_errors() == "", f"{what}: the container's reads failed\n{self.daemon.log_tail()}"


def _kill_and_start(daemon: EmbeddedDaemon) -> None:
    ready = len(daemon.events("daemon_ready"))
    daemon.stop(kill=True)
    daemon.start(timeout_s=120)
    wait_until(lambda: len(daemon.events("daemon_ready")) > ready, 120, "the restarted daemon to be ready")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if reason := fuse_missing():
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("live-restart")
    layout = base / "layout"
    images.build_simple_image(layout, FILES, cmd=["/bin/busybox", "true"])
    with EmbeddedRegistry(base / "registry") as registry:
        target = f"{registry.address}/restart/app:1"
        converted = peerpull_cmd("convert", "--quiet", "--chunk-size", str(images.CHUNK), f"oci:{layout}:latest",
                                 target, timeout=600)
        assert converted.returncode == 0, converted.stderr[-2000:]
        relay = RelayProcess(registry.url, base)
        env = {"PEERPULL_SNAPSHOTTER_FD_HOLDER": "true", "PEERPULL_SNAPSHOTTER_KEEP_MOUNT_ON_STOP": "true",
               "PEERPULL_SNAPSHOTTER_FUSE_BACKEND": "kernel", "PEERPULL_SNAPSHOTTER_PREFETCH": "none",
               "PEERPULL_SNAPSHOTTER_STREAM": "never", "PEERPULL_SNAPSHOTTER_PROFILE_RECORD": "false",
               "PEERPULL_SNAPSHOTTER_PROFILE_FETCH": "false", "PEERPULL_SNAPSHOTTER_HANDOVER_TIMEOUT_S": "60"}
        daemon = EmbeddedDaemon(base / "daemon", extra_env=env)
        try:
            daemon.start(timeout_s=120)
            with ContainerdProcess(base / "containerd", proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
                image = target.replace(registry.address, relay.address)
                pulled = peerpull_cmd("pull", image, "--address", str(ctrd.socket), "--namespace", NAMESPACE,
                                      "--json", timeout=600)
                assert pulled.returncode == 0, pulled.stderr[-2000:] + daemon.log_tail()
                container = f"restart-{uuid.uuid4().hex[:8]}"
                ctrd.ctr("run", "-d", "--runc-root", str(ctrd.root / "runc"), "--snapshotter", "peerpull", image,
                         container, "/bin/busybox", "sh", "-c", CONTAINER_LOOP)
                pid = _task_pid(ctrd, container)
                root = Path(f"/proc/{pid}/root")
                wait_until(lambda: (root / "tmp" / "rounds").exists(), 120, "the container's first round")
                reader = Reader(root).start()
                node = Node(registry, relay, daemon, ctrd, image, container, reader)
                try:
                    node.keeps_reading("the start")
                    yield node
                finally:
                    reader.close()
                    ctrd.ctr("tasks", "kill", "-s", "SIGKILL", container, check=False)
        finally:
            daemon.close()  # SIGTERM keeps the mount for a successor; close() unmounts it: the holder ends
            sock = daemon.sock_dir / "fd-holder.sock"
            if holder_ping(sock, 2.0) is not None:
                holder_stop(sock)
            relay.close()
            assert mounted_at(daemon.fuse_mount) is None


def _task_pid(ctrd: ContainerdProcess, container: str) -> int:
    for line in ctrd.ctr("tasks", "ls").stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == container:
            return int(fields[1])
    raise AssertionError(f"no task for {container}")


def test_a_planned_handover_does_not_break_running_readers(node: Node) -> None:
    for round_ in range(2):  # twice in a row: a successor hands over as well as its predecessor
        node.reader.reset()
        before = node.daemon.pid
        node.daemon.hand_over()
        assert node.daemon.pid != before
        node.keeps_reading(f"handover {round_ + 1}")
        print(f"handover {round_ + 1}: longest read {node.reader.longest_s:.3f} s (loaded machine)")
    adopted = node.daemon.events("fuse_session_adopted")
    assert [e["source"] for e in adopted[-2:]] == ["handover", "handover"]
    assert node.daemon.events("fuse_session_init") and len(node.daemon.events("fuse_session_init")) == 1, \
        "a successor must serve without a new INIT"


def test_a_crash_does_not_break_running_readers(node: Node) -> None:
    node.reader.reset()
    _kill_and_start(node.daemon)
    node.keeps_reading("SIGKILL and start")
    print(f"crash: longest read {node.reader.longest_s:.3f} s (loaded machine)")
    adopted = node.daemon.events("fuse_session_adopted")[-1]
    assert adopted["source"] == "holder"
    assert mounted_at(node.daemon.fuse_mount) == "fuse.peerpull"


def test_a_crash_during_a_slow_origin_read_is_resent_to_the_successor(node: Node) -> None:
    if not node.daemon.events("fuse_session_init")[0]["resend"]:
        pytest.skip("this kernel does not resend FUSE requests (FUSE_HAS_RESEND, 6.9+): the read would hang")
    fd = os.open(node.reader.root / LAZY, os.O_RDONLY)
    offset = LAZY_SIZE - RESERVED // 2
    result: dict[str, Any] = {}

    def read() -> None:
        try:
            result["data"] = os.pread(fd, READ_SIZE, offset)
        except OSError as exc:
            result["error"] = exc

    node.reader.reset()
    node.relay.arm()
    reading = threading.Thread(target=read, daemon=True)
    started = time.monotonic()
    reading.start()
    wait_until(node.relay.delayed, 60, "the read of an unfetched chunk to reach the origin")
    assert "data" not in result, "the read was answered before the daemon died: the crash missed it"
    _kill_and_start(node.daemon)
    reading.join(120)
    os.close(fd)
    assert "error" not in result, f"the in-flight read failed: {result.get('error')!r}"
    assert result.get("data") == FILES[LAZY][offset:offset + READ_SIZE]
    took = time.monotonic() - started
    assert node.daemon.events("fuse_session_adopted")[-1]["resent"] is True
    node.keeps_reading("SIGKILL during a slow origin read")
    print(f"crash in a slow read: that read took {took:.3f} s, longest other read {node.reader.longest_s:.3f} s "
          "(loaded machine)")


def test_a_file_open_in_passthrough_survives_a_handover_and_a_crash(node: Node) -> None:
    """The container reads CACHED whole every round: once complete it is copied to the object store and
    opened in passthrough. A handle opened then stays readable across a planned handover and a
    crash, its backing id is carried over (not registered again), and new opens never fail."""
    wait_until(lambda: any(e.get("bytes") == len(FILES[CACHED]) for e in node.daemon.events("passthrough_materialised")),
               120, "the cached file to be materialised for passthrough")
    time.sleep(1.0)  # the container's handles opened before the copy close within a round
    fd = os.open(node.reader.root / CACHED, os.O_RDONLY)  # answered with a backing id
    try:
        time.sleep(3.0)  # the daemon refreshes the fd holder's copy of its open files each second
        for how in ("handover", "crash"):
            if how == "handover":
                node.daemon.hand_over()
            else:
                _kill_and_start(node.daemon)
            adopted = node.daemon.events("fuse_session_adopted")[-1]
            assert adopted["passthrough_files"] >= 1, adopted
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, len(FILES[CACHED]), 0) == FILES[CACHED], how
            assert (node.reader.root / CACHED).read_bytes() == FILES[CACHED], f"a new open after the {how}"
            node.keeps_reading(f"the {how} with a passthrough file open")
    finally:
        os.close(fd)
    assert (node.reader.root / CACHED).read_bytes() == FILES[CACHED]


def test_new_containers_start_after_the_restarts(node: Node) -> None:
    # containerd's connection to the snapshotter socket backs off while nobody listens (a crash)
    wait_until(lambda: node.ctrd.ctr("snapshots", "--snapshotter", "peerpull", "ls", check=False).returncode == 0,
               60, "containerd to reconnect to the restarted daemon", poll_s=0.5)
    out = run_container(node.ctrd, node.image, ["/bin/busybox", "md5sum", "-c", "/check.md5"], snapshotter="peerpull",
                        timeout=120)
    assert out.count(": OK") == len(SMALL) + 1, out
    node.keeps_reading("a new container")


# ---- the state a successor gets ---------------------------------------------------------------


async def test_the_session_state_round_trips_through_msgpack(tmp_path: Path) -> None:
    """What a daemon exports (INIT state, lookups, open files, layers, extras) resumes an equal
    session on the same connection, after the frame encoding a handover uses."""
    import msgpack

    if reason := fuse_missing():
        pytest.skip(reason)
    fs = Scripted()
    carried: list[Any] = []
    fs.add_state_hook("passthrough", lambda: {"ids": [3, 4]}, carried.append)
    async with mounted(fs, tmp_path / "mnt") as mount:
        assert mount.session is not None
        handle = await in_thread(os.open, tmp_path / "mnt" / images_layer_dir(fs) / "d" / "f", os.O_RDONLY)
        try:
            exported = export_state(mount.session, fs)
            wire = msgpack.unpackb(msgpack.packb(exported, use_bin_type=True), raw=False, strict_map_key=False)
            assert wire["version"] == STATE_VERSION and wire["pid"] == os.getpid()
            successor_fs = Scripted()
            successor_fs.add_state_hook("passthrough", lambda: None, carried.append)
            resumed = KernelSession.from_state(successor_fs, os.dup(mount.session.fd), wire["session"])
            try:
                assert resumed.init_state() == mount.session.init_state()
                assert resumed.lookups() == mount.session.lookups() and resumed.lookups()
                assert resumed.handles() == mount.session.handles() and resumed.handles()
                assert successor_fs.adopt_state(wire["fs"]) == []
                assert carried == [{"ids": [3, 4]}]
                other = Scripted()
                other.remove_layer(next(iter(wire["fs"]["layers"].values())))
                assert other.adopt_state(wire["fs"]) == list(wire["fs"]["layers"].values())
            finally:
                os.close(resumed.fd)
        finally:
            await in_thread(os.close, handle)


def images_layer_dir(fs: Scripted) -> str:
    return str(next(iter(fs.export_state()["layers"].values()))).split(":", 1)[1]


async def test_a_kernel_without_resend_is_said_once_and_a_stop_without_holder_unmounts(tmp_path: Path) -> None:
    """The daemon's FUSE part on its own (LiveRestart.mount/started/teardown over a small layer):
    no resend negotiated → one `fuse_resend_unavailable` naming what a crash costs; a stop with
    keep_mount_on_stop but no holder cannot keep the connection for anyone, so it unmounts."""
    import structlog

    if reason := fuse_missing():
        pytest.skip(reason)
    point = tmp_path / "mnt"
    config = SnapshotterConfig(root=str(tmp_path), fd_holder=False, keep_mount_on_stop=True, fuse_backend="kernel")
    live = LiveRestart(config, point, tmp_path)
    fuse = live.mount(Scripted(), None)
    assert isinstance(fuse, KernelMount) and fuse.session is not None
    fuse.session.resend = False  # as negotiated with a kernel before 6.9
    serving = asyncio.create_task(fuse.serve())
    with structlog.testing.capture_logs() as logs:
        async with asyncio.TaskGroup() as group:
            await live.started(group, asyncio.current_task())  # type: ignore[arg-type]
        assert (await in_thread(os.listdir, point)) == [images_layer_dir(Scripted())]
        await live.teardown(serving)
    warned = [e for e in logs if e["event"] == "fuse_resend_unavailable"]
    assert len(warned) == 1 and "planned handover" in warned[0]["consequence"]
    assert not live.holder_active and mounted_at(point) is None


def test_takeover_without_a_running_daemon_is_one_line_and_exit_10(tmp_path: Path) -> None:
    run = Path(tempfile.mkdtemp(prefix="p1-takeover-", dir="/run" if os.access("/run", os.W_OK) else None))
    try:
        result = peerpull_cmd("daemon", "--takeover", "--root", str(tmp_path / "root"), "--socket", str(run / "s.sock"),
                              "--discovery", "none", "--cache-dir", str(tmp_path / "cache"), "--listen", "127.0.0.1:0",
                              env={**os.environ, "PEERPULL_SNAPSHOTTER_HANDOVER_SOCKET": str(run / "handover.sock"),
                                   "PEERPULL_SNAPSHOTTER_HANDOVER_TIMEOUT_S": "1"}, timeout=120)
        assert result.returncode == 10, result.stderr[-2000:]
        assert "no session handed over on" in result.stderr and not (run / "handover.sock").exists()
    finally:
        shutil.rmtree(run, ignore_errors=True)
