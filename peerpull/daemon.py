"""The node daemon: the peer component, the FUSE mount and the snapshots service in one process
and one event loop, started and torn down in order (FUSE unmounted, sockets closed, metadata
flushed), whatever stops it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

import pyfuse3
import pyfuse3.asyncio
import structlog

from converter.format.errors import ConfigError
from peer.node import PeerNode
from peerpull.config import PeerpullConfig
from snapshotter.fs.file_reader import FileReader
from snapshotter.fs.fusefs import LayerFS
from snapshotter.service.mounts import Layout
from snapshotter.service.remote import RemoteLayers
from snapshotter.service.grpc_service import SnapshotService, serve
from snapshotter.service.store import SnapshotStore

log = structlog.get_logger(__name__)
FUSE_FSNAME = "peerpull"


def check_host() -> None:
    """Fail early, with the fix, when this host cannot run the daemon."""
    if os.geteuid() != 0:
        raise ConfigError("peerpull daemon needs root (it mounts FUSE and overlay filesystems)")
    if not os.path.exists("/dev/fuse"):
        raise ConfigError("/dev/fuse is missing: load the fuse module (modprobe fuse), or give the container "
                          "the device (--device /dev/fuse, or the chart's hostPath volume)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        raise ConfigError(f"/dev/fuse cannot be opened: {exc.strerror}") from None


def writable_dir(path: Path, what: str, fix: str) -> None:
    """Create `path` if needed and prove it takes files; else one ConfigError naming the fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".peerpull-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path} is not usable ({exc.strerror or exc}): {fix}") from None


def mounted_at(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path`, if any."""
    target = str(path)
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        fields = line.split()
        if len(fields) > 2 and fields[1] == target:
            return fields[2]
    return None


def unmount_stale(path: Path) -> bool:
    """Detach a FUSE mount left at `path` by a daemon that died; True if there was one."""
    if mounted_at(path) is None:
        return False
    result = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"a stale mount at {path} cannot be removed: {result.stderr.strip()}")
    log.warning("stale_mount_removed", path=str(path))
    return True


def _raise_read_ahead(mountpoint: Path, kb: int) -> None:
    # The kernel's default 128 KiB readahead on a FUSE mount halves sequential throughput. The
    # device number comes from mountinfo: a stat() of the mount would wait on our own FUSE loop.
    device = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == str(mountpoint):
            device = fields[2]
    knob = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    try:
        knob.write_text(str(kb))
        log.info("fuse_read_ahead_set", knob=str(knob), kb=int(knob.read_text()))
    except OSError as exc:
        log.warning("fuse_read_ahead_unchanged", knob=str(knob), error=str(exc))


class NodeDaemon:
    def __init__(self, config: PeerpullConfig) -> None:
        self.config = config
        self.layout = Layout(Path(config.snapshotter.root))
        self.peer = PeerNode(config.peer, config.registry)
        self.fs: LayerFS | None = None
        self.service: SnapshotService | None = None
        self._tuning: asyncio.Task[None] | None = None

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled."""
        check_host()
        sc = self.config.snapshotter
        socket_path = Path(sc.socket)
        if len(str(socket_path)) > 100:
            raise ConfigError(f"snapshotter.socket path is too long for a unix socket: {socket_path}")
        writable_dir(self.layout.root, "snapshotter root", "give a writable directory (--root DIR, snapshotter.root)")
        writable_dir(socket_path.parent, "socket directory",
                     "give a socket path in a writable directory (--socket PATH, snapshotter.socket)")
        unmount_stale(self.layout.fuse)
        self.layout.fuse.mkdir(exist_ok=True)
        async with AsyncExitStack() as stack, asyncio.TaskGroup() as group:
            store = SnapshotStore(self.layout.root / "metadata.db")
            stack.callback(store.close)
            peer_ready = asyncio.Event()
            peer_task = group.create_task(self.peer.run(peer_ready))
            stack.callback(peer_task.cancel)
            await _wait_or_fail(peer_ready, peer_task)
            assert self.peer.fetcher is not None and self.peer.registry is not None
            reader = FileReader(self.peer.fetcher, sc.memory_cache_bytes, sc.prefetch, self.config.peer.prefetch_parallel)
            stack.push_async_callback(reader.close)
            self.fs = LayerFS(reader)
            remote = RemoteLayers(self.layout.root, store, self.fs, self.peer.registry, sc.prefetch,
                                  trust_registry=self.peer.trust_registry)
            restored = remote.restore()
            fuse_task = self._mount()
            stack.push_async_callback(self._unmount, fuse_task)
            self.service = SnapshotService(store, self.layout, remote,
                                           on_fallback=lambda reason: self.peer.metrics.errors.labels("lazy", reason).inc())
            orphans = await asyncio.to_thread(self.service.remove_orphans)
            server = await serve(self.service, socket_path)
            stack.push_async_callback(server.stop, 5)
            stack.callback(socket_path.unlink, True)
            if not Path(sc.containerd_address).exists():
                log.warning("containerd_not_found", address=sc.containerd_address,
                            hint="start containerd with the snippet of `peerpull containerd-config` in its config; "
                                 "until then nothing calls this snapshotter")
            log.info("daemon_ready", socket=str(socket_path), mount=str(self.layout.fuse), layers_restored=restored,
                     snapshots=len(store.all()), orphans_removed=orphans, prefetch=sc.prefetch)
            if ready is not None:
                ready.set()
            await asyncio.Future()  # until cancelled

    def _mount(self) -> asyncio.Task[None]:
        assert self.fs is not None
        sc = self.config.snapshotter
        pyfuse3.asyncio.enable()
        options = set(pyfuse3.default_options)
        options |= {f"fsname={FUSE_FSNAME}", "subtype=peerpull", "ro", "allow_other", "default_permissions"}
        pyfuse3.init(self.fs, str(self.layout.fuse), options)
        log.info("fuse_mounted", mount=str(self.layout.fuse))
        task = asyncio.create_task(pyfuse3.main(min_tasks=4, max_tasks=sc.fuse_max_tasks))
        self._tuning = asyncio.create_task(self._tune(sc.fuse_read_ahead_kb))
        return task

    async def _tune(self, kb: int) -> None:
        # the kernel sets the mount's readahead when FUSE's INIT completes: change it after that
        await asyncio.sleep(0.5)
        await asyncio.to_thread(_raise_read_ahead, self.layout.fuse, kb)

    async def _unmount(self, fuse_task: asyncio.Task[None]) -> None:
        pyfuse3.terminate()
        try:
            await asyncio.wait_for(fuse_task, 5)
        except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
            fuse_task.cancel()
        try:
            pyfuse3.close(unmount=True)
        except Exception as exc:  # a busy mount: detach it lazily so the next start is clean
            log.warning("fuse_unmount_failed", error=str(exc))
        if mounted_at(self.layout.fuse):
            subprocess.run(["umount", "-l", str(self.layout.fuse)], capture_output=True)
        log.info("fuse_unmounted", mount=str(self.layout.fuse))


async def _wait_or_fail(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    waiter = asyncio.ensure_future(event.wait())
    done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        task.result()  # raises why the peer component stopped
        raise ConfigError("the peer component stopped during start-up")
