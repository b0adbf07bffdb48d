"""One FUSE connection served by peerpull itself: the kernel protocol on a /dev/fuse descriptor.

The descriptor is non-blocking and watched with `loop.add_reader`; each read returns exactly one
request. Requests that never wait (lookups, attributes, directories, xattrs) are answered inline;
READ runs as a task (it may wait on the network), at most `max_tasks` at once; further requests
stay queued in the kernel until a task ends. INTERRUPT cancels the request's task, which answers
EINTR. Replies go out with one `os.writev` each.

Unlike libfuse, the session's negotiated state is plain data (`init_state()`), so a successor can
serve the same descriptor without INIT (`KernelSession.resume`): the kernel never notices a
process change. Lookup counts are tracked per inode for the same reason.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from typing import Any

import structlog

from converter.format.errors import PeerpullError
from snapshotter.fs.fusefs import Attr, LayerFS
from snapshotter.fs.guard import FsError, errno_for
from snapshotter.fs.kernel import abi
from snapshotter.fs.kernel.abi import InitFlag, Op

log = structlog.get_logger(__name__)

MAX_WRITE = 1 << 20
MAX_PAGES = 256
MAX_BACKGROUND = 64  # async readahead requests in flight (the kernel's default is 12)
CONGESTION_THRESHOLD = 48
READS_PER_WAKEUP = 64  # requests taken per readable event before other callbacks run
WANTED = (InitFlag.ASYNC_READ | InitFlag.PARALLEL_DIROPS | InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO
          | InitFlag.MAX_PAGES | InitFlag.CACHE_SYMLINKS | InitFlag.ABORT_ERROR | InitFlag.INIT_EXT
          | InitFlag.PASSTHROUGH | InitFlag.HAS_RESEND)
_STATE_KEYS = ("major", "minor", "flags", "max_write", "max_pages", "max_readahead", "max_background",
               "congestion_threshold", "time_gran", "max_stack_depth")


class SessionError(PeerpullError):
    """The FUSE session cannot do what was asked (protocol too old, feature not negotiated)."""


class SessionEnded(Exception):
    """The connection is gone (unmounted, aborted): nothing more will be read."""


def _valid(timeout_s: float) -> tuple[int, int]:
    whole = int(timeout_s)
    return whole, int((timeout_s - whole) * 1e9)


def _attr_bytes(a: Attr) -> bytes:
    sec, nsec = divmod(a.time_ns, 1_000_000_000)
    return abi.ATTR.pack(a.ino, a.size, a.blocks, sec, sec, sec, nsec, nsec, nsec, a.mode, a.nlink, a.uid, a.gid,
                         a.rdev & 0xFFFFFFFF, a.blksize, 0)


def _entry_bytes(a: Attr) -> bytes:
    entry_s, entry_ns = _valid(a.entry_timeout)
    attr_s, attr_ns = _valid(a.attr_timeout)
    return abi.ENTRY_OUT_HEAD.pack(a.ino, 0, entry_s, attr_s, entry_ns, attr_ns) + _attr_bytes(a)


def _name(body: memoryview) -> bytes:
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise ValueError("name without its NUL")
    return raw[:end]


class KernelSession:
    """Serves `fs` on the FUSE connection `fd` (INIT done: by `negotiate`, or by a predecessor)."""

    def __init__(self, fs: LayerFS, fd: int, state: dict[str, int], max_tasks: int = 512) -> None:
        self.fs = fs
        self.fd = fd
        self._state = {k: int(state[k]) for k in _STATE_KEYS}
        self._max_tasks = max_tasks
        self._buffer = bytearray(max(abi.MIN_READ_BUFFER, self._state["max_write"] + 4096))
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._interrupted: set[int] = set()
        self._lookups: dict[int, int] = {}
        self._opens: dict[int, list[int]] = {}  # inode → [open handles, backing id or 0]
        self._reading = False
        self._ended: asyncio.Future[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0  # requests read (tests and the benchmark count them)
        self.reads = 0  # READ requests among them
        self.interrupts = 0  # requests answered EINTR after an INTERRUPT
        flags = self._state["flags"]
        self.passthrough = bool(flags & InitFlag.PASSTHROUGH) and self._state["max_stack_depth"] > 0
        self.resend = bool(flags & InitFlag.HAS_RESEND)
        self._ops: dict[int, Callable[[int, int, memoryview], Any]] = {
            Op.LOOKUP: self._lookup, Op.FORGET: self._forget, Op.BATCH_FORGET: self._batch_forget,
            Op.GETATTR: self._getattr, Op.READLINK: self._readlink, Op.OPEN: self._open, Op.RELEASE: self._release,
            Op.STATFS: self._statfs, Op.GETXATTR: self._getxattr, Op.LISTXATTR: self._listxattr,
            Op.OPENDIR: self._opendir, Op.READDIR: self._readdir, Op.READDIRPLUS: self._readdirplus,
            Op.RELEASEDIR: self._releasedir, Op.ACCESS: self._access, Op.INTERRUPT: self._interrupt,
            Op.DESTROY: self._destroy, Op.INIT: self._late_init,
        }

    # ---- INIT, state and resumption -----------------------------------------------------------

    @classmethod
    def negotiate(cls, fs: LayerFS, fd: int, max_tasks: int = 512) -> KernelSession:
        """Answer the kernel's INIT on a freshly mounted `fd` (blocking: INIT is queued at mount)."""
        buffer = bytearray(1 << 16)
        while True:
            n = os.readv(fd, [buffer])
            length, opcode, unique, *_ = abi.IN_HEADER.unpack_from(buffer)
            if opcode != Op.INIT or length != n:
                raise SessionError(f"the FUSE connection's first request is opcode {opcode}, not INIT")
            major, minor, max_readahead, low = abi.INIT_IN.unpack_from(buffer, abi.IN_HEADER.size)
            if major > abi.KERNEL_MAJOR:  # the kernel asks again with our major
                os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size + 8, 0, unique)
                         + struct.pack("<II", abi.KERNEL_MAJOR, abi.KERNEL_MINOR))
                continue
            break
        offered = low
        if low & InitFlag.INIT_EXT and n >= abi.IN_HEADER.size + abi.INIT_IN.size + 4:
            offered |= abi.INIT_IN_FLAGS2.unpack_from(buffer, abi.IN_HEADER.size + abi.INIT_IN.size)[0] << 32
        minor = min(minor, abi.KERNEL_MINOR)
        if major != abi.KERNEL_MAJOR or minor < abi.MIN_MINOR:
            os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -errno.EPROTO, unique))
            raise SessionError(f"the kernel speaks FUSE {major}.{minor}; the kernel backend needs "
                               f"{abi.KERNEL_MAJOR}.{abi.MIN_MINOR} or newer (fuse_backend: pyfuse3 serves it)")
        chosen = int(WANTED & offered)
        depth = abi.PASSTHROUGH_STACK_DEPTH if chosen & InitFlag.PASSTHROUGH else 0
        state = {"major": major, "minor": minor, "flags": chosen, "max_write": MAX_WRITE, "max_pages": MAX_PAGES,
                 "max_readahead": max_readahead, "max_background": MAX_BACKGROUND,
                 "congestion_threshold": CONGESTION_THRESHOLD, "time_gran": 1, "max_stack_depth": depth}
        low_out, high_out = abi.split_flags(chosen)
        reply = abi.INIT_OUT.pack(major, minor, max_readahead, low_out, MAX_BACKGROUND, CONGESTION_THRESHOLD,
                                  MAX_WRITE, 1, MAX_PAGES, 0, high_out, depth)
        os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(reply), 0, unique) + reply)
        session = cls(fs, fd, state, max_tasks)
        log.info("fuse_session_init", protocol=f"{major}.{minor}", offered=hex(offered), flags=hex(chosen),
                 passthrough=session.passthrough, resend=session.resend, max_write=MAX_WRITE)
        return session

    @classmethod
    def resume(cls, fs: LayerFS, fd: int, state: dict[str, int], max_tasks: int = 512,
               lookups: dict[int, int] | None = None,
               handles: dict[int, tuple[int, int]] | None = None) -> KernelSession:
        """Serve a connection a predecessor negotiated (its `init_state()`): no INIT is sent or awaited.
        `lookups` and `handles` are the predecessor's `lookups()` and `handles()`: backing ids belong
        to the connection and stay valid, and must be reused while their inode is open."""
        session = cls(fs, fd, state, max_tasks)
        session._lookups = dict(lookups or {})
        session._opens = {ino: [count, backing] for ino, (count, backing) in (handles or {}).items()}
        log.info("fuse_session_resumed", protocol=f"{state['major']}.{state['minor']}", flags=hex(state["flags"]),
                 passthrough=session.passthrough, resend=session.resend, inodes=len(session._lookups))
        return session

    def init_state(self) -> dict[str, int]:
        """What INIT settled (major, minor, the 64-bit flags, max_write, max_pages …): plain ints."""
        return dict(self._state)

    def lookups(self) -> dict[int, int]:
        """The kernel's references per inode (LOOKUP and READDIRPLUS entries minus FORGETs)."""
        return dict(self._lookups)

    def handles(self) -> dict[int, tuple[int, int]]:
        """Open files per inode: (opens not yet released, backing id or 0 when served through READ)."""
        return {ino: (count, backing) for ino, (count, backing) in self._opens.items()}

    # ---- passthrough and resend ---------------------------------------------------------------

    def open_backing(self, fd: int) -> int:
        """Register `fd` (a file on a plain filesystem) with the connection; the backing id for OPEN."""
        if not self.passthrough:
            raise SessionError("FUSE passthrough was not negotiated on this connection (kernel 6.9+ offers it)")
        try:
            return int(fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_OPEN, bytearray(abi.BACKING_MAP.pack(fd, 0, 0)), True))
        except OSError as exc:
            raise SessionError(f"the kernel refused a FUSE backing file ({exc.strerror})") from exc

    def close_backing(self, backing_id: int) -> None:
        if not self.passthrough:
            raise SessionError("FUSE passthrough was not negotiated on this connection (kernel 6.9+ offers it)")
        try:
            fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, bytearray(abi.BACKING_ID.pack(backing_id)), True)
        except OSError as exc:
            raise SessionError(f"the kernel refused to close FUSE backing id {backing_id} ({exc.strerror})") from exc

    def notify_resend(self) -> None:
        """Ask the kernel to send again every request a predecessor read but never answered."""
        if not self.resend:
            raise SessionError("the kernel does not resend FUSE requests (FUSE_HAS_RESEND, kernel 6.9+)")
        os.write(self.fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size, abi.Notify.RESEND, 0))

    # ---- the loop -----------------------------------------------------------------------------

    async def serve(self) -> str:
        """Serve until the connection ends: "destroy" (the kernel said goodbye) or "unmounted"."""
        self._loop = asyncio.get_running_loop()
        self._ended = self._loop.create_future()
        os.set_blocking(self.fd, False)
        self._resume_reading()
        try:
            return await self._ended
        finally:
            self._pause_reading()
            await self.cancel_requests()

    async def cancel_requests(self) -> None:
        """Cancel requests in flight without answering them (the connection is going away)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """End serve() without touching the connection (a successor or the unmount takes it from here)."""
        if self._ended is not None and not self._ended.done():
            self._ended.set_result("stopped")

    def _resume_reading(self) -> None:
        if not self._reading and self._loop is not None and self._ended is not None and not self._ended.done():
            self._loop.add_reader(self.fd, self._readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def _end(self, reason: str) -> None:
        self._pause_reading()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(reason)

    def _readable(self) -> None:
        view = memoryview(self._buffer)
        for _ in range(READS_PER_WAKEUP):
            if len(self._tasks) >= self._max_tasks:
                self._pause_reading()  # the kernel keeps the rest queued; a finished task resumes
                return
            try:
                n = os.readv(self.fd, [self._buffer])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                    self._end("unmounted")
                    return
                raise
            if n == 0:
                self._end("unmounted")
                return
            self._dispatch(bytes(view[:n]))

    def _dispatch(self, data: bytes) -> None:
        self.requests += 1
        if len(data) < abi.IN_HEADER.size:
            log.error("fuse_bad_request", size=len(data), error="shorter than a request header")
            return  # no unique id to answer
        length, opcode, unique, nodeid, *_ = abi.IN_HEADER.unpack_from(data)
        if length != len(data):
            log.error("fuse_bad_request", opcode=opcode, size=len(data), length=length)
            self._error(unique, errno.EIO)
            return
        body = memoryview(data)[abi.IN_HEADER.size:]
        if opcode == Op.READ:
            self.reads += 1
            try:
                fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
            except struct.error:
                log.error("fuse_bad_request", opcode=opcode, size=len(data))
                self._error(unique, errno.EIO)
                return
            self._start(unique, self._read(unique, fh, offset, size))
            return
        handler = self._ops.get(opcode)
        if handler is None:
            self._error(unique, errno.EROFS if opcode in abi.WRITE_OPS else errno.ENOSYS)
            return
        try:
            handler(unique, nodeid, body)
        except FsError as exc:
            self._error(unique, exc.errno)
        except (struct.error, ValueError) as exc:
            log.error("fuse_bad_request", opcode=opcode, size=len(data), error=str(exc))
            self._error(unique, errno.EIO)
        except Exception as exc:  # noqa: BLE001 - the kernel seam: every request gets an answer
            code = errno_for(exc)
            log.error("fuse_handler_failed", op=_op_name(opcode), errno=errno.errorcode.get(code, code),
                      error=repr(exc), exc_info=True)
            self._error(unique, code)

    def _start(self, unique: int, work: Any) -> None:
        assert self._loop is not None
        self._tasks[unique] = self._loop.create_task(work)

    async def _read(self, unique: int, fh: int, offset: int, size: int) -> None:
        try:
            data = await self.fs.read(fh, offset, size)
        except FsError as exc:
            self._error(unique, exc.errno)
            return
        except asyncio.CancelledError:
            if unique in self._interrupted:
                self.interrupts += 1
                self._error(unique, errno.EINTR)
                return
            raise
        except Exception as exc:  # noqa: BLE001 - the kernel seam: every request gets an answer
            log.error("fuse_handler_failed", op="read", errno="EIO", error=repr(exc), exc_info=True)
            self._error(unique, errno.EIO)
            return
        finally:
            # the bookkeeping of a finished request (cheaper here than in a done callback)
            self._tasks.pop(unique, None)
            self._interrupted.discard(unique)
            if not self._reading and len(self._tasks) < self._max_tasks:
                self._resume_reading()
        self._reply(unique, data)

    # ---- replies ------------------------------------------------------------------------------

    def _reply(self, unique: int, *parts: bytes) -> None:
        total = abi.OUT_HEADER.size + sum(len(p) for p in parts)
        self._write([abi.OUT_HEADER.pack(total, 0, unique), *parts])

    def _error(self, unique: int, code: int) -> None:
        self._write([abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -code, unique)])

    def _write(self, parts: list[bytes]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            # ENOENT: the request was interrupted or aborted meanwhile; ENODEV: the connection is gone
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED):
                log.error("fuse_reply_failed", error=str(exc))

    # ---- operations (each answers, or raises FsError / a bad-size error) -----------------------

    def _lookup(self, unique: int, nodeid: int, body: memoryview) -> None:
        attr = self.fs.lookup(nodeid, _name(body))
        self._lookups[attr.ino] = self._lookups.get(attr.ino, 0) + 1
        self._reply(unique, _entry_bytes(attr))

    def _forget_one(self, nodeid: int, count: int) -> None:
        left = self._lookups.get(nodeid, 0) - count
        if left > 0:
            self._lookups[nodeid] = left
        else:
            self._lookups.pop(nodeid, None)

    def _forget(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._forget_one(nodeid, abi.FORGET_IN.unpack_from(body)[0])

    def _batch_forget(self, unique: int, nodeid: int, body: memoryview) -> None:
        count, _ = abi.BATCH_FORGET_IN.unpack_from(body)
        for i in range(count):
            self._forget_one(*abi.FORGET_ONE.unpack_from(body, abi.BATCH_FORGET_IN.size + i * abi.FORGET_ONE.size))

    def _getattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        attr = self.fs.getattr(nodeid)
        attr_s, attr_ns = _valid(attr.attr_timeout)
        self._reply(unique, abi.ATTR_OUT_HEAD.pack(attr_s, attr_ns, 0) + _attr_bytes(attr))

    def _readlink(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._reply(unique, self.fs.readlink(nodeid))

    def _access(self, unique: int, nodeid: int, body: memoryview) -> None:
        self.fs.access(nodeid, abi.ACCESS_IN.unpack_from(body)[0])
        self._reply(unique)

    def _statfs(self, unique: int, nodeid: int, body: memoryview) -> None:
        s = self.fs.statfs()
        self._reply(unique, abi.KSTATFS.pack(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namemax,
                                             s.frsize, 0))

    def _sized(self, unique: int, size: int, value: bytes) -> None:
        # size 0 asks how big the value is; a value larger than the caller's buffer is ERANGE
        if size == 0:
            self._reply(unique, abi.GETXATTR_OUT.pack(len(value), 0))
        elif len(value) > size:
            self._error(unique, errno.ERANGE)
        else:
            self._reply(unique, value)

    def _getxattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        self._sized(unique, size, self.fs.getxattr(nodeid, _name(body[abi.GETXATTR_IN.size:])))

    def _listxattr(self, unique: int, nodeid: int, body: memoryview) -> None:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        self._sized(unique, size, b"".join(name + b"\0" for name in self.fs.listxattr(nodeid)))

    def _opendir(self, unique: int, nodeid: int, body: memoryview) -> None:
        abi.OPEN_IN.unpack_from(body)
        fh = self.fs.opendir(nodeid)
        # a layer's directories never change: the kernel may keep their listings; the top one changes
        flags = 0 if nodeid == abi.ROOT_ID else abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE
        self._reply(unique, abi.OPEN_OUT.pack(fh, flags, 0))

    def _releasedir(self, unique: int, nodeid: int, body: memoryview) -> None:
        self.fs.releasedir(abi.RELEASE_IN.unpack_from(body)[0])
        self._reply(unique)

    def _readdir(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._listing(unique, body, plus=False)

    def _readdirplus(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._listing(unique, body, plus=True)

    def _listing(self, unique: int, body: memoryview, plus: bool) -> None:
        fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
        out: list[bytes] = []
        used = 0
        while True:
            entries = self.fs.readdir(fh, offset)
            if not entries:
                break
            for name, attr, next_offset in entries:
                record = abi.dirent_size(len(name), plus)
                if used + record > size:
                    self._reply(unique, *out)
                    return
                head = _entry_bytes(attr) if plus else b""
                dirent = abi.DIRENT_HEAD.pack(attr.ino, next_offset, len(name), stat.S_IFMT(attr.mode) >> 12)
                out.append(head + dirent + name + b"\0" * (record - len(head) - len(dirent) - len(name)))
                used += record
                if plus:
                    self._lookups[attr.ino] = self._lookups.get(attr.ino, 0) + 1
                offset = next_offset
        self._reply(unique, *out)

    def _open(self, unique: int, nodeid: int, body: memoryview) -> None:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        fh = self.fs.open(nodeid, flags)
        opened = self._opens.get(nodeid)
        if opened is None:
            # the first open decides how the inode is served until its last close: the kernel refuses
            # one inode open in passthrough and cached mode at once
            opened = self._opens[nodeid] = [0, self._backing_for(nodeid)]
        opened[0] += 1
        if opened[1]:
            self._reply(unique, abi.OPEN_OUT.pack(fh, abi.FOPEN_PASSTHROUGH, opened[1]))
        else:
            self._reply(unique, abi.OPEN_OUT.pack(fh, abi.FOPEN_KEEP_CACHE, 0))

    def _backing_for(self, nodeid: int) -> int:
        """A backing id for the inode's complete local file (0: serve it through READ)."""
        if not self.passthrough:
            return 0
        path = self.fs.backing_path(nodeid)
        if path is None:
            return 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("fuse_backing_unavailable", inode=nodeid, path=str(path), error=exc.strerror)
            return 0
        try:
            return self.open_backing(fd)
        except SessionError as exc:
            log.warning("fuse_backing_unavailable", inode=nodeid, path=str(path), error=str(exc))
            return 0
        finally:
            os.close(fd)  # the kernel keeps its own reference

    def _release(self, unique: int, nodeid: int, body: memoryview) -> None:
        fh = abi.RELEASE_IN.unpack_from(body)[0]
        self.fs.release(fh)
        opened = self._opens.get(nodeid)
        if opened is not None:
            opened[0] -= 1
            if opened[0] <= 0:
                del self._opens[nodeid]
                if opened[1]:
                    self._close_backing_quietly(opened[1])
        self._reply(unique)

    def _close_backing_quietly(self, backing_id: int) -> None:
        try:
            self.close_backing(backing_id)
        except SessionError as exc:
            log.warning("fuse_backing_close_failed", backing_id=backing_id, error=str(exc))

    def _interrupt(self, unique: int, nodeid: int, body: memoryview) -> None:
        target = abi.INTERRUPT_IN.unpack_from(body)[0]
        task = self._tasks.get(target)
        if task is not None:  # an unknown target was answered already: nothing to do, no reply
            self._interrupted.add(target)
            task.cancel()

    def _destroy(self, unique: int, nodeid: int, body: memoryview) -> None:
        self._reply(unique)
        self._end("destroy")

    def _late_init(self, unique: int, nodeid: int, body: memoryview) -> None:
        raise FsError(errno.EPROTO)  # INIT is answered once, by negotiate()


def _op_name(opcode: int) -> str:
    try:
        return Op(opcode).name.lower()
    except ValueError:
        return str(opcode)
