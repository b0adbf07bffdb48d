"""The node's one FUSE mount on the host: mounting a LayerFS over one of two transports, serving
its loop, tuning the kernel's readahead, and removing a mount a dead daemon left behind.

`KernelMount` speaks the kernel protocol itself (kernel/session.py): its session state can be
handed to a successor and it offers FUSE passthrough. `FuseMount` serves through pyfuse3 (libfuse;
one mount per process). `open_mount` picks one by `snapshotter.fuse_backend` (auto: the kernel
transport when /dev/fuse and the negotiated protocol allow it). Either's `serve()` belongs to the
daemon's TaskGroup: if the loop ends or crashes, it raises and the daemon stops.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any, Protocol

import pyfuse3
import pyfuse3.asyncio
import structlog

from converter.format.errors import ConfigError, PeerpullError
from snapshotter.fs.fusefs import LayerFS
from snapshotter.fs.kernel.mount import mount_fd, open_device, unmount
from snapshotter.fs.kernel.session import KernelSession, SessionError
from snapshotter.fs.pyfuse3_ops import Pyfuse3Operations

log = structlog.get_logger(__name__)
FUSE_FSNAME = "peerpull"
READ_AHEAD_DELAY_S = 0.5  # the kernel sets the mount's readahead when FUSE's INIT completes


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


def raise_read_ahead(mountpoint: Path, kb: int) -> None:
    """Set the FUSE mount's readahead window (blocking: sysfs and mountinfo I/O)."""
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


class Transport(Protocol):
    """What the daemon needs of a mounted LayerFS, whichever transport serves it."""

    backend: str
    mountpoint: Path

    def open(self) -> None: ...
    async def serve(self) -> None: ...
    async def stop(self, serving: asyncio.Task[None], timeout_s: float = 5.0) -> None: ...
    def close(self) -> None: ...


def _loop_crashed(mountpoint: Path, exc: Exception) -> PeerpullError:
    log.error("fuse_loop_failed", mount=str(mountpoint), error=repr(exc), exc_info=True)
    return PeerpullError(f"the FUSE loop at {mountpoint} crashed ({exc!r}): the daemon stops; "
                         "restart it (lazily served files fail until then)")


def _loop_ended(mountpoint: Path, why: str) -> PeerpullError:
    log.error("fuse_loop_failed", mount=str(mountpoint), error=why)
    return PeerpullError(f"the FUSE loop at {mountpoint} ended ({why}): the daemon stops; restart it")


class FuseMount:
    """`fs` mounted at `mountpoint`: `open()` mounts, `serve()` runs the loop, `close()` unmounts."""

    backend = "pyfuse3"

    def __init__(self, fs: LayerFS, mountpoint: Path, max_tasks: int, read_ahead_kb: int) -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        self._max_tasks = max_tasks
        self._read_ahead_kb = read_ahead_kb
        self._opened = False
        self._stopping = False

    def open(self) -> None:
        pyfuse3.asyncio.enable()
        options = set(pyfuse3.default_options)
        options |= {f"fsname={FUSE_FSNAME}", "subtype=peerpull", "ro", "allow_other", "default_permissions"}
        pyfuse3.init(Pyfuse3Operations(self.fs), str(self.mountpoint), options)
        self._opened = True
        log.info("fuse_mounted", mount=str(self.mountpoint), backend=self.backend)

    async def serve(self) -> None:
        """Serve FUSE requests until cancelled; raises PeerpullError if the loop ends on its own."""
        tuning = asyncio.create_task(self._tune())
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=self._max_tasks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _loop_crashed(self.mountpoint, exc) from exc
        finally:
            tuning.cancel()
            await asyncio.gather(tuning, return_exceptions=True)
        if not self._stopping:
            raise _loop_ended(self.mountpoint, "pyfuse3's loop returned; unmounted from outside?")

    async def _tune(self) -> None:
        await asyncio.sleep(READ_AHEAD_DELAY_S)
        await asyncio.to_thread(raise_read_ahead, self.mountpoint, self._read_ahead_kb)

    async def stop(self, serving: asyncio.Task[None], timeout_s: float = 5.0) -> None:
        """End the loop cleanly (pyfuse3.terminate), or cancel it if it does not end in time."""
        if not serving.done():
            self._stopping = True
            pyfuse3.terminate()
            done, _ = await asyncio.wait({serving}, timeout=timeout_s)
            if not done:
                serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    def close(self) -> None:
        """Unmount (the loop has stopped): a busy mount is detached lazily so the next start is clean."""
        if self._opened:
            self._opened = False
            try:
                pyfuse3.close(unmount=True)
            except Exception as exc:  # noqa: BLE001 - teardown goes on whatever happened
                log.warning("fuse_unmount_failed", error=str(exc))
        if mounted_at(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        log.info("fuse_unmounted", mount=str(self.mountpoint))


class KernelMount:
    """`fs` served by peerpull's own session on /dev/fuse; `session` is there once `open()` returns."""

    backend = "kernel"

    def __init__(self, fs: LayerFS, mountpoint: Path, max_tasks: int, read_ahead_kb: int) -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        self._max_tasks = max_tasks
        self._read_ahead_kb = read_ahead_kb
        self.session: KernelSession | None = None
        self._mounted = False
        self._stopping = False

    def open(self) -> None:
        fd = open_device()
        try:
            mount_fd(fd, self.mountpoint)
            self._mounted = True
            self.session = KernelSession.negotiate(self.fs, fd, self._max_tasks)
        except BaseException:
            self.close()
            os.close(fd)
            raise
        log.info("fuse_mounted", mount=str(self.mountpoint), backend=self.backend)

    @classmethod
    def adopt(cls, fs: LayerFS, mountpoint: Path, fd: int, state: dict[str, int], max_tasks: int, read_ahead_kb: int,
              lookups: dict[int, int] | None = None, handles: dict[int, tuple[Any, ...]] | None = None) -> KernelMount:
        """The mount a predecessor made, from its connection's fd and session state: served without INIT."""
        mount = cls(fs, mountpoint, max_tasks, read_ahead_kb)
        mount.session = KernelSession.resume(fs, fd, state, max_tasks, lookups, handles)
        mount._mounted = True
        log.info("fuse_mount_adopted", mount=str(mountpoint), backend=cls.backend)
        return mount

    def detach(self) -> KernelSession:
        """Give the connection away (after stop()): close() then neither unmounts nor closes its fd."""
        assert self.session is not None, "nothing to detach"
        session, self.session, self._mounted = self.session, None, False
        return session

    async def serve(self) -> None:
        """Serve FUSE requests until cancelled; raises PeerpullError if the connection ends on its own."""
        assert self.session is not None, "open() or adopt() first"
        await asyncio.to_thread(raise_read_ahead, self.mountpoint, self._read_ahead_kb)  # INIT is done
        try:
            reason = await self.session.serve()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _loop_crashed(self.mountpoint, exc) from exc
        if not self._stopping:
            raise _loop_ended(self.mountpoint, f"the kernel ended the connection: {reason}; unmounted from outside?")

    async def stop(self, serving: asyncio.Task[None], timeout_s: float = 5.0) -> None:
        """End the loop: requests in flight are cancelled (the unmount in close() fails them)."""
        self._stopping = True
        if self.session is not None:
            self.session.stop()
        done, _ = await asyncio.wait({serving}, timeout=timeout_s)
        if not done:
            serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    def close(self) -> None:
        """Unmount (detached if busy), then end the connection."""
        if self._mounted:
            self._mounted = False
            try:
                unmount(self.mountpoint)
            except ConfigError as exc:
                log.warning("fuse_unmount_failed", error=str(exc))
        if self.session is not None:
            session, self.session = self.session, None
            os.close(session.fd)
            log.info("fuse_unmounted", mount=str(self.mountpoint))


def open_mount(fs: LayerFS, mountpoint: Path, backend: str, max_tasks: int, read_ahead_kb: int) -> Transport:
    """Mount `fs` with the configured transport (auto: kernel, else pyfuse3); logs `fuse_backend_selected`."""
    mount: Transport
    if backend != "pyfuse3":
        kernel = KernelMount(fs, mountpoint, max_tasks, read_ahead_kb)
        try:
            kernel.open()
        except (ConfigError, SessionError) as exc:
            if backend == "kernel":
                raise
            log.warning("fuse_backend_selected", backend="pyfuse3", reason=f"the kernel transport cannot serve: {exc}")
        else:
            assert kernel.session is not None
            log.info("fuse_backend_selected", backend="kernel", configured=backend,
                     passthrough=kernel.session.passthrough, resend=kernel.session.resend)
            return kernel
    else:
        log.info("fuse_backend_selected", backend="pyfuse3", configured=backend)
    mount = FuseMount(fs, mountpoint, max_tasks, read_ahead_kb)
    mount.open()
    return mount
