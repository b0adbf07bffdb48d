"""Live restart: the daemon's FUSE connection outlives the daemon, so running containers stall
across a restart or a crash instead of failing with ENOTCONN (docs/snapshotter.md, "Live restart").

The policy, in one place, over the mechanisms in snapshotter/fs (handover.py, fd_holder.py and
the kernel session's exportable state):

* Planned handover: `peerpull daemon --takeover` listens on `snapshotter.handover_socket` before
  it binds anything; SIGHUP to the running daemon waits (up to `handover_timeout_s`) for that
  listener, then stops taking FUSE requests (the kernel queues them), lets those in flight finish
  (up to `handover_drain_s`), releases its gRPC socket and peer port as on any stop, sends the fd
  and state, and exits without unmounting once the successor acknowledged. The successor serves
  without INIT.
* Crash: at start the daemon gives the fd holder a copy of the fd and its state, and refreshes it
  when open files change (the backing ids a successor must reuse; lookup counts ride along, but
  they are bookkeeping only: node ids derive from the layer slots, which come back from the
  snapshot store). A daemon that starts and finds a holder with a session takes the fd, serves it,
  and asks the kernel to resend what the dead daemon had read but not answered.
* A stop (SIGTERM) with `keep_mount_on_stop` drains the same way and leaves the connection with
  the holder for the next start; without it (or without a holder) it unmounts and ends the holder.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from converter.format.errors import ConfigError
from snapshotter.config import SnapshotterConfig
from snapshotter.fs.fd_holder import holder_drop, holder_get, holder_ping, holder_put, holder_stop, spawn_holder
from snapshotter.fs.fusefs import LayerFS
from snapshotter.fs.handover import HandoverError, receive_session, send_session
from snapshotter.fs.kernel.session import KernelSession, SessionError, parse_state
from snapshotter.fs.mount import KernelMount, Transport, mounted_at, open_mount, unmount_stale

log = structlog.get_logger(__name__)

STATE_VERSION = 1  # of the state map below (the frames around it have their own version)
REFRESH_S = 1.0  # how often the holder's copy of the state is compared with the session's
FUSE_TYPE = "fuse.peerpull"


@dataclass
class Adopted:
    """A predecessor's connection: its fd (ours to close) and state, and where it came from."""

    fd: int
    state: dict[str, Any]
    source: str  # "handover" or "holder"


@dataclass
class _Pending:
    fd: int = -1
    state: dict[str, Any] = field(default_factory=dict)


def export_state(session: KernelSession, fs: LayerFS, mountpoint: Path | None = None) -> dict[str, Any]:
    """The state a successor serving `session`'s connection needs (msgpack-able plain data)."""
    return {"version": STATE_VERSION, "pid": os.getpid(), "mount": str(mountpoint) if mountpoint else "",
            "session": session.export_state(), "fs": fs.export_state()}


def adopt_mount(fs: LayerFS, mountpoint: Path, adopted: Adopted, max_tasks: int, read_ahead_kb: int) -> KernelMount:
    """Serve the adopted connection over `fs` (its layers already restored): no INIT; the kernel is
    asked to resend requests the predecessor read and never answered (they are all idempotent)."""
    state = adopted.state
    if state.get("version") != STATE_VERSION:
        raise SessionError(f"the predecessor's state is version {state.get('version')!r}, this daemon reads "
                           f"{STATE_VERSION}: run the same peerpull version on both ends")
    init, lookups, handles = parse_state(dict(state.get("session") or {}))
    mount = KernelMount.adopt(fs, mountpoint, adopted.fd, init, max_tasks, read_ahead_kb, lookups, handles)
    session = mount.session
    assert session is not None
    missing = fs.adopt_state(dict(state.get("fs") or {}))
    if missing:
        log.warning("handover_layers_missing", layers=missing,
                    consequence="files of these layers that containers still use answer ENOENT")
    resent = False
    if session.resend:
        session.notify_resend()  # before the first read: the re-queued requests are read as usual
        resent = True
    log.info("fuse_session_adopted", source=adopted.source, predecessor=state.get("pid"), resent=resent,
             inodes=len(session.lookups()), open_files=len(session.handles()),
             passthrough_files=sum(1 for _, backing in session.handles().values() if backing), mount=str(mountpoint))
    return mount


class LiveRestart:
    """The daemon's side of live restart: where its FUSE connection comes from at start, and where
    it goes on SIGHUP or a stop."""

    def __init__(self, config: SnapshotterConfig, mountpoint: Path, log_dir: Path, takeover: bool = False) -> None:
        self.config = config
        self.mountpoint = mountpoint
        self.takeover = takeover
        self.handover_socket = Path(config.handover_socket)
        self.holder_socket = Path(config.fd_holder_socket)
        self._log_dir = log_dir
        self.holder_active = False
        self.handover_requested = False
        self._fuse: Transport | None = None
        self._fs: LayerFS | None = None
        self._main: asyncio.Task[Any] | None = None
        self._waiting: asyncio.Task[None] | None = None
        self._pending: _Pending | None = None
        self._holder_handles: dict[int, tuple[int, int]] | None = None

    # ---- start --------------------------------------------------------------------------------

    async def acquire(self) -> Adopted | None:
        """Before the daemon binds anything: the connection handed over (--takeover; HandoverError
        if none comes in time) or kept by the fd holder after a crash; None: mount afresh."""
        if self.takeover:
            log.info("handover_waiting", socket=str(self.handover_socket), timeout_s=self.config.handover_timeout_s)
            fd, state = await asyncio.to_thread(receive_session, self.handover_socket, self.config.handover_timeout_s)
            return Adopted(fd, state, "handover")
        if not self._holder_wanted():
            return None
        return await asyncio.to_thread(self._from_holder)

    def _holder_wanted(self) -> bool:
        return self.config.fd_holder and self.config.fuse_backend != "pyfuse3"

    def _from_holder(self) -> Adopted | None:
        if holder_ping(self.holder_socket, 2.0) is None:
            return None
        got = holder_get(self.holder_socket)
        if got is None:
            return None
        fd, state = got
        try:
            why = self._unusable(fd, state)
        except ConfigError:
            os.close(fd)
            raise
        if why is None:
            return Adopted(fd, state, "holder")
        os.close(fd)
        if why.startswith("another daemon"):
            raise ConfigError(f"{why}: stop it first, or hand over with `peerpull daemon --takeover` and SIGHUP")
        log.warning("fd_holder_session_discarded", reason=why)
        holder_drop(self.holder_socket)
        return None

    def _unusable(self, fd: int, state: dict[str, Any]) -> str | None:
        """Why the holder's session cannot be served here (None: it can)."""
        pid = state.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _alive_daemon(pid):
            return f"another daemon (pid {pid}) still serves the FUSE mount at {self.mountpoint}"
        if state.get("mount") != str(self.mountpoint):  # another daemon's holder: not ours to take or drop
            raise ConfigError(f"the fd holder at {self.holder_socket} keeps the FUSE connection of "
                              f"{state.get('mount')!r}, not of {self.mountpoint}: give each daemon its own "
                              "snapshotter.fd_holder_socket")
        if mounted_at(self.mountpoint) != FUSE_TYPE:
            return f"nothing of peerpull is mounted at {self.mountpoint} any more"
        poller = select.poll()
        poller.register(fd, 0)
        if any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, events in poller.poll(0)):
            return "the held FUSE connection was aborted"
        return None

    def mount(self, fs: LayerFS, adopted: Adopted | None) -> Transport:
        """The daemon's FUSE mount: the adopted connection (layers already restored in `fs`), else a
        fresh one (a dead daemon's mount detached first)."""
        sc = self.config
        self._fs = fs
        if adopted is not None:
            try:
                self._fuse = adopt_mount(fs, self.mountpoint, adopted, sc.fuse_max_tasks, sc.fuse_read_ahead_kb)
                return self._fuse
            except SessionError as exc:
                os.close(adopted.fd)
                if adopted.source == "handover":
                    raise
                log.warning("fd_holder_session_discarded", reason=str(exc))
        unmount_stale(self.mountpoint)
        self.mountpoint.mkdir(exist_ok=True)
        self._fuse = open_mount(fs, self.mountpoint, sc.fuse_backend, sc.fuse_max_tasks, sc.fuse_read_ahead_kb)
        return self._fuse

    async def started(self, group: asyncio.TaskGroup, main: asyncio.Task[Any]) -> None:
        """Once the mount serves: SIGHUP hands over; the holder gets its copy and is kept fresh."""
        self._main = main
        session = self._session()
        if session is None:
            return
        if not session.resend:
            log.warning("fuse_resend_unavailable",
                        consequence="a crash of this daemon hangs the reads it had in flight until the mount is "
                                    "aborted; a planned handover (SIGHUP + --takeover) still works")
        if not self._holder_wanted():
            return
        assert self._fs is not None
        try:
            await asyncio.to_thread(spawn_holder, self.holder_socket, self._log_dir / "fd-holder.log")
            await asyncio.to_thread(self._put, session)
        except HandoverError as exc:
            log.warning("fd_holder_unavailable", error=str(exc),
                        consequence="a crash of this daemon ends the FUSE connection of running containers")
            return
        self.holder_active = True
        session.open_files.on_change = lambda: self._put_now(session)
        group.create_task(self._keep_fresh(session), name="fd-holder-refresh")

    def _session(self) -> KernelSession | None:
        return self._fuse.session if isinstance(self._fuse, KernelMount) else None

    def _put(self, session: KernelSession, state: dict[str, Any] | None = None) -> None:
        assert self._fs is not None
        self._holder_handles = session.handles()
        holder_put(self.holder_socket, session.fd, state or export_state(session, self._fs, self.mountpoint))

    def _put_now(self, session: KernelSession) -> None:
        """A backing id was registered or closed: the holder learns it before the OPEN is answered
        (rare: once per file materialised for passthrough), the rest of the table follows each second."""
        try:
            self._put(session)
        except HandoverError as exc:
            log.warning("fd_holder_refresh_failed", error=str(exc))

    async def _keep_fresh(self, session: KernelSession) -> None:
        """Put the state again when the open files changed (a successor must reuse their backing ids)."""
        while self._session() is session:
            await asyncio.sleep(REFRESH_S)
            if self._session() is session and session.handles() != self._holder_handles:
                try:
                    await asyncio.to_thread(self._put, session)
                except HandoverError as exc:
                    log.warning("fd_holder_refresh_failed", error=str(exc))

    # ---- SIGHUP -------------------------------------------------------------------------------

    def on_sighup(self) -> None:
        if self.handover_requested:
            return  # handing over already
        if self._session() is None or self._main is None:
            log.warning("handover_unavailable", reason="not serving yet" if self._fuse is None else
                        "the pyfuse3 transport cannot hand its session over (fuse_backend: kernel can)")
            return
        if self._waiting is None or self._waiting.done():
            self._waiting = asyncio.get_running_loop().create_task(self._await_successor())

    async def _await_successor(self) -> None:
        """Hand over once a successor listens; until then (and if none comes) go on serving."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.handover_timeout_s
        log.info("handover_requested", socket=str(self.handover_socket))
        while not await asyncio.to_thread(_listening, self.handover_socket):
            if loop.time() > deadline:
                log.warning("handover_no_successor", socket=str(self.handover_socket),
                            timeout_s=self.config.handover_timeout_s,
                            hint="start `peerpull daemon --takeover` with the same configuration; serving on")
                return
            await asyncio.sleep(0.1)
        self.handover_requested = True
        assert self._main is not None
        self._main.cancel()  # the daemon unwinds as on a stop; teardown() keeps the connection

    # ---- stop ---------------------------------------------------------------------------------

    async def teardown(self, serving: asyncio.Task[None]) -> None:
        """The FUSE part of the daemon's stop: keep the connection (handover, or the holder keeps it
        for the next start) or unmount it and end the holder."""
        fuse, session = self._fuse, self._session()
        if self._waiting is not None:
            self._waiting.cancel()
        assert fuse is not None and self._fs is not None
        keep = self.handover_requested or (self.config.keep_mount_on_stop and self.holder_active)
        if session is None or not keep:
            await fuse.stop(serving)
            fuse.close()
            if self.holder_active:
                await asyncio.to_thread(_quietly, holder_stop, self.holder_socket)
            return
        assert isinstance(fuse, KernelMount)
        left = await session.drain(self.config.handover_drain_s)
        state = export_state(session, self._fs, self.mountpoint)
        await fuse.stop(serving)
        fuse.detach()
        self._fuse = None
        log.info("fuse_session_drained", unanswered=left, handover=self.handover_requested,
                 resend=session.resend, drain_s=self.config.handover_drain_s)
        if self.holder_active:
            await asyncio.to_thread(_quietly, holder_put, self.holder_socket, session.fd, state)
        if self.handover_requested:
            self._pending = _Pending(session.fd, state)
        else:
            os.close(session.fd)
            log.info("fuse_mount_kept", mount=str(self.mountpoint), holder=str(self.holder_socket),
                     hint="the next `peerpull daemon` serves it on; `peerpull clean` or umount ends it")

    async def finish(self) -> None:
        """After the daemon released its sockets and port: send the connection to the successor."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            await asyncio.to_thread(send_session, self.handover_socket, pending.fd, pending.state,
                                    self.config.handover_timeout_s)
        except HandoverError as exc:
            log.error("handover_failed", error=str(exc),
                      consequence="the fd holder keeps the connection for the next start" if self.holder_active
                      else "the FUSE connection ends with this process")
        finally:
            os.close(pending.fd)


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def _alive_daemon(pid: int) -> bool:
    """Whether `pid` is a running peerpull process (not a reused pid of something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"peerpull" in cmdline and b"fd_holder" not in cmdline and b"fd-holder" not in cmdline


def _quietly(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except HandoverError as exc:
        log.warning("fd_holder_request_failed", error=str(exc))


def install_sighup(loop: asyncio.AbstractEventLoop, live: LiveRestart) -> None:
    loop.add_signal_handler(signal.SIGHUP, live.on_sighup)
