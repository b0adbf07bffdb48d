"""The FUSE error seam: every operation of the layer filesystem answers with an errno.

The filesystem core (fusefs.py) raises only `FsError(errno)`; each transport (the pyfuse3 adapter,
the kernel session) turns it into its own error reply. Under pyfuse3's asyncio loop an exception
other than `FUSEError` is lost and the caller's syscall never returns; a kernel session that drops a
request hangs its caller the same way. `fuse_handler` is the one place that turns any other failure
into `FsError`, after logging it once (`fuse_handler_failed`, with the op).
"""

from __future__ import annotations

import errno
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
GUARD_MARK = "__fuse_guarded__"
ENOATTR = errno.ENODATA  # Linux spells "no such attribute" ENODATA


class FsError(Exception):
    """The one error of the layer filesystem: the errno a reader's syscall fails with."""

    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.errno = code


def errno_for(exc: BaseException) -> int:
    """The errno a reader sees for `exc`: an OSError keeps its own, anything else is EIO."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, NotImplementedError):
        return errno.ENOSYS
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    return errno.EIO


def _failed(op: str, args: tuple[Any, ...], exc: Exception) -> FsError:
    code = errno_for(exc)
    log.error("fuse_handler_failed", op=op, args=_describe(args[1:]), errno=errno.errorcode.get(code, code),
              error=repr(exc), exc_info=True)
    return FsError(code)


def fuse_handler(handler: F) -> F:
    """Guard one filesystem operation (sync or async): FsError passes through, any other exception
    is logged (`fuse_handler_failed`) and becomes FsError(errno_for(exc))."""
    op = handler.__name__

    if inspect.iscoroutinefunction(handler):
        @functools.wraps(handler)
        async def guarded_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await handler(*args, **kwargs)
            except FsError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the seam: nothing else may reach a transport
                raise _failed(op, args, exc) from None

        setattr(guarded_async, GUARD_MARK, True)
        return guarded_async  # type: ignore[return-value]

    @functools.wraps(handler)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except FsError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the seam: nothing else may reach a transport
            raise _failed(op, args, exc) from None

    setattr(guarded, GUARD_MARK, True)
    return guarded  # type: ignore[return-value]


def _describe(args: tuple[Any, ...]) -> list[object]:
    # inode numbers, offsets and names identify the request; contexts and tokens say nothing
    return [a if isinstance(a, (int, bytes)) else type(a).__name__ for a in args]
