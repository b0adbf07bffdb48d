"""The gRPC seam: one table from the error taxonomy to gRPC status codes, one wrapper for every RPC.

containerd's errdefs turns NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, … back into its own
error kinds, so the code matters more than the message. Anything outside the taxonomy is a bug:
INTERNAL, logged once, never UNKNOWN.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import structlog

from converter.format import errors

log = structlog.get_logger(__name__)

# looked up along the exception's MRO: the nearest class wins (a registry 404 is NOT_FOUND)
STATUS: dict[type[BaseException], grpc.StatusCode] = {
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FormatError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RegistryUnreachableError: grpc.StatusCode.UNAVAILABLE,
    errors.ContainerdError: grpc.StatusCode.UNAVAILABLE,
    errors.UnsupportedError: grpc.StatusCode.UNIMPLEMENTED,
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
}

F = TypeVar("F", bound=Callable[..., Any])


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status for `exc`; INTERNAL for anything the table does not name."""
    return next((STATUS[c] for c in type(exc).__mro__ if c in STATUS), grpc.StatusCode.INTERNAL)


async def _abort(method: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
    code = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("snapshot_rpc_failed", method=method, error=str(exc) or type(exc).__name__,
                  error_type=type(exc).__name__, exc_info=not isinstance(exc, (errors.PeerpullError, OSError)))
    detail = str(exc) if isinstance(exc, errors.PeerpullError) else f"{method}: {type(exc).__name__}: {exc}"
    await context.abort(code, detail)


def rpc(method: F) -> F:
    """Wrap an RPC handler (unary, or streaming as an async generator) so every error is mapped here."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one place RPC errors become statuses
                await _abort(name, exc, context)

        stream.mapped_errors = True  # type: ignore[attr-defined]
        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one place RPC errors become statuses
            await _abort(name, exc, context)

    unary.mapped_errors = True  # type: ignore[attr-defined]
    return unary  # type: ignore[return-value]
