"""The FUSE error seam: every pyfuse3 handler of the layer filesystem answers with an errno.

Under pyfuse3's asyncio loop, an exception other than `FUSEError` escaping a handler is lost (or
ends the main loop) and the caller's syscall never returns. `fuse_handler` is the one place that
turns any other failure into `FUSEError`, after logging it once.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import structlog

log = structlog.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
GUARD_MARK = "__fuse_guarded__"


def errno_for(exc: BaseException) -> int:
    """The errno a reader sees for `exc`: an OSError keeps its own, anything else is EIO."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, NotImplementedError):
        return errno.ENOSYS
    if isinstance(exc, MemoryError):
        return errno.ENOMEM
    return errno.EIO


def fuse_handler(handler: F) -> F:
    """Guard one pyfuse3 handler: FUSEError passes through, any other exception is logged
    (`fuse_handler_failed`) and becomes FUSEError(errno_for(exc))."""
    op = handler.__name__

    @functools.wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the seam: nothing else may reach pyfuse3
            code = errno_for(exc)
            log.error("fuse_handler_failed", op=op, args=_describe(args[1:]), errno=errno.errorcode.get(code, code),
                      error=repr(exc), exc_info=True)
            raise pyfuse3.FUSEError(code) from None

    setattr(guarded, GUARD_MARK, True)
    return guarded  # type: ignore[return-value]


def _describe(args: tuple[Any, ...]) -> list[object]:
    # inode numbers, offsets and names identify the request; contexts and tokens say nothing
    return [a if isinstance(a, (int, bytes)) else type(a).__name__ for a in args]
