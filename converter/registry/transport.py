"""The transport under RegistryClient: one aiohttp session, retries, deadlines and body limits.

A registry is not trusted to behave. Every request has a connect timeout and an idle read timeout;
a bounded operation (request, status check and body read, retried as a whole) must finish within
`request_deadline_s`; retries back off, each wait capped at `backoff_max_s` and never past the
deadline; bodies are read against a limit and refused the moment they pass it; an error answer is
read at most 64 KiB. Every failure is one line naming the registry, what happened and the setting
to change, and is counted by kind in `faults`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import aiohttp
import structlog

from converter.format import untrusted
from converter.format.errors import AuthError, RegistryError, RegistryNotFoundError, RegistryUnreachableError
from converter.registry.auth import Authenticator, CredentialSource
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference

log = structlog.get_logger(__name__)
T = TypeVar("T")
Self = TypeVar("Self", bound="RegistryTransport")

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_MANIFEST_BYTES = 4 << 20  # manifests and indexes: containerd's limit
MAX_CONFIG_BYTES = 8 << 20  # image configs and other small blobs read whole
MAX_ERROR_BODY_BYTES = 64 << 10  # what is read of an error answer
MAX_BLOB_BYTES = 1 << 40  # a blob announced at 1 TiB or more is a lie
MAX_RANGE_BYTES = 512 << 20  # one ranged read (a TOC is at most format.MAX_TOC_BYTES)
MAX_IGNORED_RANGE_BYTES = 16 << 20  # a registry ignoring Range may still send a small blob whole
_RESET_AFTER_BYTES = 16 << 20  # a resumed stream that made this much progress earns its retries back

# errors of one attempt that another attempt will not fix
_FINAL_KINDS = frozenset({"not_http", "tls"})


@dataclass
class _Tries:
    """Retry state of one operation: attempts left and the loop time it must end by (None: no deadline)."""

    retries: int
    end: float | None
    attempt: int = 0


class _Stall(Exception):
    """A blob stream slower than the minimum speed."""


def _error_detail(body: bytes) -> str:
    try:
        errors = untrusted.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errors[:2])
    except (ValueError, AttributeError, TypeError):
        return ""


def _content_length(resp: aiohttp.ClientResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


_NET_ERRORS = (aiohttp.ClientError, TimeoutError, _Stall)


class RegistryTransport:
    """Requests to registries with the guarantees above; RegistryClient adds the OCI operations."""

    def __init__(self, config: RegistryConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._auth: Authenticator | None = None
        self._credentials: CredentialSource | None = None
        self.faults: Counter[str] = Counter()  # fault kind → count, for peerpull's metrics

    async def __aenter__(self: Self) -> Self:
        # sock_connect, not connect: waiting for a free pooled connection is not a registry fault
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._config.connect_timeout_s,
                                        sock_read=self._config.read_timeout_s)
        connector = aiohttp.TCPConnector(limit_per_host=self._config.max_connections_per_host)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        self._auth = Authenticator(self._session, self._config.docker_config, self._credentials)
        return self

    def use_credentials(self, source: CredentialSource) -> None:
        """Ask `source` (credentials handed over at run time) before docker's config.json."""
        self._credentials = source
        if self._auth is not None:
            self._auth.source = source

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    def _base(self, ref: ImageReference) -> str:
        plain = ref.is_loopback or ref.registry in self._config.insecure_hosts
        return f"{'http' if plain else 'https'}://{ref.api_host}/v2/{ref.repository}"

    def _classify(self, exc: BaseException, ref: ImageReference) -> tuple[str, str]:
        """(fault kind, one-line reason) of a failed attempt."""
        c = self._config
        if isinstance(exc, _Stall):
            return "stall", str(exc)
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return "timeout", f"no connection within {c.connect_timeout_s:g} s (registry.connect_timeout_s)"
        if isinstance(exc, (aiohttp.SocketTimeoutError, TimeoutError)):
            return "timeout", f"nothing received for {c.read_timeout_s:g} s (registry.read_timeout_s)"
        if isinstance(exc, aiohttp.ClientSSLError):
            return "tls", (f"TLS failed ({type(getattr(exc, 'os_error', exc)).__name__}); if {ref.registry} serves "
                           f"plain HTTP, use --insecure-registry {ref.registry}")
        if isinstance(exc, aiohttp.ClientResponseError):  # raised by the HTTP parser, not by a status
            return "not_http", ("did not answer in HTTP (is it HTTPS? use --insecure-registry only for "
                                "plain-HTTP registries)")
        if isinstance(exc, aiohttp.ClientPayloadError):
            return "truncated", "the answer was cut short"
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return "disconnected", "the registry closed the connection"
        os_error = getattr(exc, "os_error", None)
        reason = (os_error.strerror if os_error is not None and os_error.strerror else str(exc)) or type(exc).__name__
        return "connect", " ".join(reason.split())

    def _net_error(self, kind: str, reason: str, ref: ImageReference, what: str) -> RegistryError:
        if kind == "connect":
            return RegistryUnreachableError(f"cannot reach registry {ref.registry}: {reason} ({what})")
        if kind in _FINAL_KINDS:
            return RegistryError(f"registry {ref.registry} {reason} ({what})")
        return RegistryUnreachableError(f"{what}: registry {ref.registry}: {reason}")

    async def _pause(self, tries: _Tries, ref: ImageReference, kind: str, retry_after: str | None = None) -> bool:
        """Wait before another attempt; False when no attempt or no time is left for one."""
        if tries.attempt >= tries.retries:
            return False
        c = self._config
        delay = min(c.backoff_base_s * (2 ** tries.attempt), c.backoff_max_s)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), c.backoff_max_s))
        loop = asyncio.get_running_loop()
        if tries.end is not None and loop.time() + delay >= tries.end:
            return False
        tries.attempt += 1
        self.faults["retry"] += 1
        log.debug("registry_retry", registry=ref.registry, fault=kind, attempt=tries.attempt)
        await asyncio.sleep(delay)
        return True

    async def _request(
        self, method: str, ref: ImageReference, url: str, *, what: str, tries: _Tries,
        headers: dict[str, str] | None = None, body: bytes | None = None, push: bool = False, extra_scope: str = "",
    ) -> aiohttp.ClientResponse:
        """Send one request (with auth and retries); the caller owns and must release the response."""
        assert self._session is not None and self._auth is not None, "use RegistryClient as an async context manager"
        scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}" + (f" {extra_scope}" if extra_scope else "")
        authed = False
        while True:
            hdrs = dict(headers or {})
            if (auth := self._auth.header(ref.registry, scope)) is not None:
                hdrs["Authorization"] = auth
            try:
                resp = await self._session.request(method, url, headers=hdrs, data=body)
            except _NET_ERRORS as exc:
                kind, reason = self._classify(exc, ref)
                self.faults[kind] += 1
                if kind in _FINAL_KINDS or not await self._pause(tries, ref, kind):
                    raise self._net_error(kind, reason, ref, what) from None
                continue
            if resp.status == 401 and not authed:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.close()
                authed = True
                if await self._auth.answer(ref.registry, scope, challenge, hdrs.get("Authorization")):
                    continue
                raise AuthError(f"{what}: {ref.registry} requires authentication; {self._auth.describe(ref.registry, ref.repository)}")
            if resp.status in _RETRY_STATUS:
                self.faults[f"http_{resp.status}"] += 1
                retry_after = resp.headers.get("Retry-After")
                if await self._pause(tries, ref, f"http_{resp.status}", retry_after):
                    resp.close()
                    continue
            return resp

    async def _bounded(
        self, method: str, ref: ImageReference, url: str, *, what: str, ok: tuple[int, ...],
        read: Callable[[aiohttp.ClientResponse], Awaitable[T]], headers: dict[str, str] | None = None,
        body: bytes | None = None, push: bool = False, extra_scope: str = "", retries: int | None = None,
        deadline_s: float | None = None,
    ) -> T:
        """One bounded operation: request, status check and `read` of the body, retried as a whole,
        all within the deadline. `read` must bound what it reads and release the response."""
        seconds = deadline_s if deadline_s is not None else self._config.request_deadline_s
        loop = asyncio.get_running_loop()
        tries = _Tries(self._config.retries if retries is None else retries, loop.time() + seconds)
        scope = asyncio.timeout(seconds)
        try:
            async with scope:
                while True:
                    resp = await self._request(method, ref, url, what=what, tries=tries, headers=headers, body=body,
                                               push=push, extra_scope=extra_scope)
                    if resp.status not in ok:
                        raise await self._fail(resp, ref, what)
                    try:
                        return await read(resp)
                    except _NET_ERRORS as exc:
                        resp.close()
                        kind, reason = self._classify(exc, ref)
                        self.faults[kind] += 1
                        if kind in _FINAL_KINDS or not await self._pause(tries, ref, kind):
                            raise self._net_error(kind, reason, ref, what) from None
        except TimeoutError:
            if not scope.expired():
                raise
            self.faults["timeout"] += 1
            raise RegistryUnreachableError(
                f"{what}: registry {ref.registry} did not finish within {seconds:g} s "
                f"(registry.request_deadline_s, env PEERPULL_REGISTRY_REQUEST_DEADLINE_S)") from None

    def _oversized(self, resp: aiohttp.ClientResponse, ref: ImageReference, what: str, limit: int,
                   announced: int | None = None, asked: bool = False) -> RegistryError:
        resp.close()
        self.faults["oversized"] += 1
        sent = f"announced {announced} bytes" if announced is not None else "kept sending"
        bound = f"the {limit} bytes asked for" if asked else f"the {_human(limit)} limit"
        return RegistryError(f"{what}: registry {ref.registry} {sent}, more than {bound}")

    async def _read_limited(self, resp: aiohttp.ClientResponse, limit: int, ref: ImageReference, what: str,
                            asked: bool = False) -> bytes:
        """The whole body, refused as soon as it passes `limit` bytes (announced or received)."""
        announced = _content_length(resp)
        if announced is not None and announced > limit:
            raise self._oversized(resp, ref, what, limit, announced, asked)
        parts: list[bytes] = []
        size = 0
        while block := await resp.content.read(1 << 20):
            size += len(block)
            if size > limit:
                raise self._oversized(resp, ref, what, limit, asked=asked)
            parts.append(block)
        resp.release()
        return b"".join(parts)

    async def _fail(self, resp: aiohttp.ClientResponse, ref: ImageReference, what: str) -> RegistryError:
        if resp.status not in _RETRY_STATUS:  # those were counted where they were retried
            self.faults[f"http_{resp.status}"] += 1
        body = b""
        try:
            while len(body) < MAX_ERROR_BODY_BYTES and (block := await resp.content.read(MAX_ERROR_BODY_BYTES)):
                body += block
        except _NET_ERRORS:
            pass
        resp.close()  # never reuse a connection with an unread error body
        detail = _error_detail(body[:MAX_ERROR_BODY_BYTES])
        suffix = f" ({' '.join(detail.split())[:300]})" if detail else ""
        if resp.status in (401, 403):
            assert self._auth is not None
            return AuthError(f"{what}: {ref.registry} refused access (HTTP {resp.status}) with "
                             f"{self._auth.describe(ref.registry, ref.repository)}{suffix}")
        if resp.status == 404:
            return RegistryNotFoundError(f"{what} not found{suffix}")
        if resp.status in _RETRY_STATUS:
            return RegistryError(f"{what}: {ref.registry} kept failing (HTTP {resp.status}) after retries{suffix}")
        return RegistryError(f"{what}: {ref.registry} answered HTTP {resp.status}{suffix}")

    def _discard(self, ref: ImageReference, what: str) -> Callable[[aiohttp.ClientResponse], Awaitable[str]]:
        """A `read` for control requests: the Location header; the (small) body is read and dropped."""
        async def read(resp: aiohttp.ClientResponse) -> str:
            location = resp.headers.get("Location", "")
            await self._read_limited(resp, MAX_ERROR_BODY_BYTES, ref, what)
            return location
        return read


def _human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"
