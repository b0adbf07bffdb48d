"""One FUSE connection served by peerpull itself: the kernel protocol on a /dev/fuse descriptor.

The descriptor is non-blocking and watched with `loop.add_reader`; each read returns exactly one
request. Requests that never wait (lookups, attributes, directories, xattrs) are answered inline;
a READ runs eagerly and is answered inline too when its data is in memory; one that has to wait
(the network) goes on as a task, at most `max_tasks` at once; further requests stay queued in the
kernel until a task ends. INTERRUPT cancels the request's task, which answers
EINTR. Replies go out with one `os.writev` each.

Unlike libfuse, the session's negotiated state is plain data (`init_state()`), so a successor can
serve the same descriptor without INIT (`KernelSession.resume`): the kernel never notices a
process change. The operations themselves (and the lookup counts and open files a successor
also needs) are in requests.py, INIT in handshake.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import fcntl
import os
import struct
from collections.abc import Coroutine
from typing import Any

import structlog

from snapshotter.fs.fusefs import LayerFS
from snapshotter.fs.guard import FsError, errno_for
from snapshotter.fs.kernel import abi
from snapshotter.fs.kernel.abi import InitFlag, Op
from snapshotter.fs.kernel.handshake import STATE_KEYS, negotiate
from snapshotter.fs.kernel.handshake import SessionError as SessionError
from snapshotter.fs.kernel.requests import Requests
from snapshotter.fs.passthrough import OpenFiles

log = structlog.get_logger(__name__)

READS_PER_WAKEUP = 64  # requests taken per readable event before other callbacks run


class KernelSession:
    """Serves `fs` on the FUSE connection `fd` (INIT done: by `negotiate`, or by a predecessor)."""

    def __init__(self, fs: LayerFS, fd: int, state: dict[str, int], max_tasks: int = 512) -> None:
        self.fs = fs
        self.fd = fd
        self._state = {k: int(state[k]) for k in STATE_KEYS}
        self._max_tasks = max_tasks
        self._buffer = bytearray(max(abi.MIN_READ_BUFFER, self._state["max_write"] + 4096))
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._interrupted: set[int] = set()
        self._reading = False
        self._draining = False  # drain(): read nothing more, the kernel queues it for a successor
        self._ended: asyncio.Future[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0  # requests read (tests and the benchmark count them)
        self.reads = 0  # READ requests among them
        self.interrupts = 0  # requests answered EINTR after an INTERRUPT
        flags = self._state["flags"]
        self.passthrough = bool(flags & InitFlag.PASSTHROUGH) and self._state["max_stack_depth"] > 0
        self.resend = bool(flags & InitFlag.HAS_RESEND)
        self._requests = Requests(fs, self.open_backing if self.passthrough else None, self.close_backing)

    # ---- INIT, state and resumption -----------------------------------------------------------

    @classmethod
    def negotiate(cls, fs: LayerFS, fd: int, max_tasks: int = 512) -> KernelSession:
        """Answer the kernel's INIT on a freshly mounted `fd` and serve the connection."""
        return cls(fs, fd, negotiate(fd), max_tasks)

    @classmethod
    def resume(cls, fs: LayerFS, fd: int, state: dict[str, int], max_tasks: int = 512,
               lookups: dict[int, int] | None = None,
               handles: dict[int, tuple[Any, ...]] | None = None) -> KernelSession:
        """Serve a connection a predecessor negotiated (its `init_state()`): no INIT is sent or awaited.
        `lookups` and `handles` are the predecessor's `lookups()` and `handles()` — (opens, backing id)
        per inode, plus the store object backing it when it came through `export_state()`: backing ids
        belong to the connection and stay valid, and must be reused while their inode is open; their
        objects are pinned again here so the store never evicts a file open in passthrough."""
        session = cls(fs, fd, state, max_tasks)
        session._requests.lookups = dict(lookups or {})
        session._requests.files.adopt_state(
            {"files": [[ino, h[0], h[1], h[2] if len(h) > 2 else ""] for ino, h in (handles or {}).items()]})
        log.info("fuse_session_resumed", protocol=f"{state['major']}.{state['minor']}", flags=hex(state["flags"]),
                 passthrough=session.passthrough, resend=session.resend, inodes=len(session._requests.lookups))
        return session

    def init_state(self) -> dict[str, int]:
        """What INIT settled (major, minor, the 64-bit flags, max_write, max_pages …): plain ints."""
        return dict(self._state)

    def lookups(self) -> dict[int, int]:
        """The kernel's references per inode (LOOKUP and READDIRPLUS entries minus FORGETs)."""
        return dict(self._requests.lookups)

    def handles(self) -> dict[int, tuple[int, int]]:
        """Open files per inode: (opens not yet released, backing id or 0 when served through READ)."""
        return self._requests.files.handles()

    @property
    def open_files(self) -> OpenFiles:
        """The open files and backing ids (with their store objects: `export_state()` for a successor)."""
        return self._requests.files

    def export_state(self) -> dict[str, Any]:
        """Everything `from_state` needs to serve this connection in another process: plain data
        (msgpack-able; tuples come back as lists, which `resume` accepts)."""
        return {"init": self.init_state(), "lookups": self.lookups(),
                "handles": {ino: [opens, backing, key]
                            for ino, opens, backing, key in self._requests.files.export_state()["files"]}}

    @classmethod
    def from_state(cls, fs: LayerFS, fd: int, state: dict[str, Any], max_tasks: int = 512) -> KernelSession:
        """Resume the connection `fd` from a predecessor's `export_state()` (SessionError if it is not one)."""
        init, lookups, handles = parse_state(state)
        return cls.resume(fs, fd, init, max_tasks, lookups, handles)

    async def drain(self, timeout_s: float) -> int:
        """Read no more requests (the kernel keeps them queued for whoever serves the fd next) and
        wait up to `timeout_s` for those in flight to be answered; how many were still in flight.
        Those stay unanswered when the session stops: a successor's `notify_resend` re-queues them."""
        self._draining = True
        self._pause_reading()
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks and timeout_s > 0:
            await asyncio.wait(tasks, timeout=timeout_s)
        return sum(1 for t in self._tasks.values() if not t.done())

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
        if self._reading or self._draining:
            return
        if self._loop is not None and self._ended is not None and not self._ended.done():
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
            self._start_read(unique, fh, offset, size)
            return
        if opcode == Op.INTERRUPT or opcode == Op.DESTROY or opcode == Op.INIT:
            self._session_request(opcode, unique, body)
            return
        handler = self._requests.table.get(opcode)
        if handler is None:
            self._error(unique, errno.EROFS if opcode in abi.WRITE_OPS else errno.ENOSYS)
            return
        try:
            reply = handler(nodeid, body)
            if reply is not None:
                self._reply(unique, *reply)
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

    def _start_read(self, unique: int, fh: int, offset: int, size: int) -> None:
        """Run the READ eagerly: served from memory it is answered now, without a task or another
        loop iteration (a quarter of the CPU per request); only a read that waits (a fetch, a slot)
        goes on in a task. The code before a read's first await therefore runs outside a task: it
        must not need one (asyncio.timeout, TaskGroup); fetches run in tasks of their own."""
        assert self._loop is not None
        context = contextvars.copy_context()
        coro = self._read(unique, fh, offset, size)
        try:
            waiting = context.run(coro.send, None)
        except StopIteration:
            return
        task = self._loop.create_task(self._drive(coro, waiting), context=context)
        task.add_done_callback(lambda _: coro.close())  # a task cancelled before it ran leaves coro suspended
        self._tasks[unique] = task

    @staticmethod
    async def _drive(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        """Go on with a coroutine suspended in its eager first step, as its own Task would have:
        resume it when what it waits for is done; on cancellation, cancel that (the coroutine then
        sees the CancelledError), or throw the cancellation in when there is nothing to cancel."""
        while True:
            throw = False
            if waiting is None:  # a bare yield (asyncio.sleep(0))
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    throw = True
            elif getattr(waiting, "_asyncio_future_blocking", None) is None:
                throw_bad = RuntimeError(f"a read awaited {waiting!r}, not an asyncio future")
                try:
                    waiting = coro.throw(throw_bad)  # as a Task would: the read answers EIO
                except StopIteration:
                    return
                continue
            else:
                waiting._asyncio_future_blocking = False
                try:
                    await asyncio.wait({waiting})
                except asyncio.CancelledError:
                    if waiting.cancel():
                        while not waiting.done():  # a task cancels asynchronously
                            with contextlib.suppress(asyncio.CancelledError):
                                await asyncio.wait({waiting})
                    else:
                        throw = True
            try:
                waiting = coro.throw(asyncio.CancelledError()) if throw else coro.send(None)
            except StopIteration:
                return

    async def _read(self, unique: int, fh: int, offset: int, size: int) -> None:
        try:
            data = await self.fs.read(fh, offset, size)
        except FsError as exc:
            self._answered(unique)
            self._error(unique, exc.errno)
            return
        except asyncio.CancelledError:
            if unique in self._interrupted:
                self._answered(unique)
                self.interrupts += 1
                self._error(unique, errno.EINTR)
                return
            raise  # the session stops: the request stays unanswered for a successor (resend)
        except Exception as exc:  # noqa: BLE001 - the kernel seam: every request gets an answer
            log.error("fuse_handler_failed", op="read", errno="EIO", error=repr(exc), exc_info=True)
            self._answered(unique)
            self._error(unique, errno.EIO)
            return
        self._answered(unique)
        self._reply(unique, data)

    def _answered(self, unique: int) -> None:
        self._tasks.pop(unique, None)
        self._interrupted.discard(unique)
        if not self._reading and len(self._tasks) < self._max_tasks:
            self._resume_reading()

    def _interrupted_silently(self, unique: int) -> None:
        # a READ whose task was cancelled before it ran never reached _read's handlers: answer for
        # it, or the interrupted caller waits for its reply forever
        if unique in self._interrupted:
            self._answered(unique)
            self.interrupts += 1
            self._error(unique, errno.EINTR)

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

    # ---- requests about the session itself ----------------------------------------------------

    def _session_request(self, opcode: int, unique: int, body: memoryview) -> None:
        if opcode == Op.INTERRUPT:
            try:
                target = abi.INTERRUPT_IN.unpack_from(body)[0]
            except struct.error:
                return  # INTERRUPT has no reply, not even an error
            task = self._tasks.get(target)
            if task is not None and not task.done():  # an unknown target was answered already
                self._interrupted.add(target)
                task.cancel()
                task.add_done_callback(lambda _: self._interrupted_silently(target))
        elif opcode == Op.DESTROY:
            self._reply(unique)
            self._end("destroy")
        else:
            self._error(unique, errno.EPROTO)  # INIT is answered once, by negotiate()


def parse_state(state: dict[str, Any]) -> tuple[dict[str, int], dict[int, int], dict[int, tuple[Any, ...]]]:
    """A predecessor's `export_state()` after msgpack: (INIT state, lookups, handles); SessionError
    if it is not one."""
    try:
        init = {k: int(state["init"][k]) for k in STATE_KEYS}
        lookups = {int(ino): int(n) for ino, n in dict(state.get("lookups") or {}).items()}
        handles: dict[int, tuple[Any, ...]] = {
            int(ino): (int(h[0]), int(h[1]), *([str(h[2])] if len(h) > 2 else []))
            for ino, h in dict(state.get("handles") or {}).items()}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SessionError(f"a predecessor's FUSE session state is incomplete ({exc!r})") from None
    return init, lookups, handles


def _op_name(opcode: int) -> str:
    try:
        return Op(opcode).name.lower()
    except ValueError:
        return str(opcode)
