"""OCI Distribution v2 client on one aiohttp session: manifests, blobs, Range reads, pushes.

Hand-written (see auth.py for why). A registry is not trusted to be well-behaved, so:
- every body has a size limit (manifests 4 MiB as containerd, configs 8 MiB, ranges exactly the
  bytes asked for, error bodies 64 KiB, blobs their descriptor's size) and is never read past it;
- every request has a connect timeout and an idle read timeout; bounded requests (everything but
  whole-blob downloads) must finish, retries included, within `request_deadline_s`; whole-blob
  streams resume after a stall instead (see RegistryConfig);
- retries (429/5xx, dropped connections) back off, each wait capped and never past the deadline;
- failures become one-line errors from the project's taxonomy naming the registry, what happened
  and the setting to change, and each is counted in `faults` (for the metrics).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import urlencode, urljoin

import aiohttp
import structlog

from converter import untrusted
from converter.digest import DigestWriter, is_digest, sha256_digest, verify_bytes
from converter.errors import (AuthError, DigestMismatchError, FormatError, NotFoundError, RegistryError,
                              RegistryUnreachableError, UnsupportedError)
from converter.registry import media_types as mt
from converter.registry.auth import Authenticator
from converter.registry.config import RegistryConfig
from converter.registry.platform import check_config_platform, describe, matches
from converter.registry.reference import ImageReference

log = structlog.get_logger(__name__)
T = TypeVar("T")

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


@dataclass(frozen=True)
class FetchedManifest:
    media_type: str
    body: bytes
    digest: str


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


def well_formed_digest(value: object) -> bool:
    """A `sha256:<64 hex>` string, with nothing after it (not even the newline a `$` regex lets by)."""
    return isinstance(value, str) and len(value) == 71 and is_digest(value)


def _content_length(resp: aiohttp.ClientResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


_NET_ERRORS = (aiohttp.ClientError, TimeoutError, _Stall)


class RegistryClient:
    def __init__(self, config: RegistryConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._auth: Authenticator | None = None
        self.faults: Counter[str] = Counter()  # fault kind → count, for peerpull's metrics

    async def __aenter__(self) -> "RegistryClient":
        # sock_connect, not connect: waiting for a free pooled connection is not a registry fault
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._config.connect_timeout_s,
                                        sock_read=self._config.read_timeout_s)
        connector = aiohttp.TCPConnector(limit_per_host=self._config.max_connections_per_host)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
        self._auth = Authenticator(self._session, self._config.docker_config)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    # ---- plumbing ------------------------------------------------------------------------

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
            return "not_http", (f"did not answer in HTTP (is it HTTPS? use --insecure-registry only for "
                                f"plain-HTTP registries)")
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
                raise AuthError(f"{what}: {ref.registry} requires authentication; {self._auth.describe(ref.registry)}")
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
                             f"{self._auth.describe(ref.registry)}{suffix}")
        if resp.status == 404:
            return NotFoundError(f"{what} not found{suffix}")
        if resp.status in _RETRY_STATUS:
            return RegistryError(f"{what}: {ref.registry} kept failing (HTTP {resp.status}) after retries{suffix}")
        return RegistryError(f"{what}: {ref.registry} answered HTTP {resp.status}{suffix}")

    # ---- manifests -----------------------------------------------------------------------

    async def get_manifest(self, ref: ImageReference) -> FetchedManifest:
        what = f"manifest {ref}"

        async def read(resp: aiohttp.ClientResponse) -> tuple[str, bytes]:
            return resp.headers.get("Content-Type", ""), await self._read_limited(resp, MAX_MANIFEST_BYTES, ref, what)

        content_type, body = await self._bounded(
            "GET", ref, f"{self._base(ref)}/manifests/{ref.reference}", what=what, ok=(200,), read=read,
            headers={"Accept": mt.ACCEPT_MANIFESTS})
        if ref.digest:
            verify_bytes(body, ref.digest, what)
        media_type = content_type.split(";")[0].strip()
        try:
            doc = untrusted.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{what}: not valid JSON") from None
        if not isinstance(doc, dict):
            raise FormatError(f"{what}: not a JSON object")
        return FetchedManifest(doc.get("mediaType") or media_type, body, sha256_digest(body))

    async def resolve_image(self, ref: ImageReference) -> tuple[FetchedManifest, FetchedManifest | None]:
        """The image manifest of `ref` for the configured platform, and the index it came from (if any).

        With an explicitly configured platform, a single-platform image must be of that platform."""
        fetched = await self.get_manifest(ref)
        if fetched.media_type not in mt.INDEX_TYPES:
            if self._config.platform:
                await self._check_platform(ref, fetched)
            return fetched, None
        entries = untrusted.loads(fetched.body).get("manifests")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise FormatError(f"index {ref}: 'manifests' is not a list of descriptors")
        wanted = self._config.index_platform
        for entry in entries:
            if matches(entry.get("platform") or {}, wanted) and well_formed_digest(entry.get("digest")):
                return await self.get_manifest(ref.with_digest(entry["digest"])), fetched
        have = ", ".join(sorted({describe(e.get("platform") or {}) for e in entries}))
        raise UnsupportedError(f"{ref} has no image for {wanted} (it has: {have or 'none'}); "
                               "choose one of those with --platform")

    async def _check_platform(self, ref: ImageReference, fetched: FetchedManifest) -> None:
        try:
            config = untrusted.loads(fetched.body).get("config") or {}
            digest = config["digest"]
        except (ValueError, AttributeError, KeyError, TypeError):
            return  # not an image manifest: the caller says so
        check_config_platform(await self.get_blob_bytes(ref, digest), self._config.platform, str(ref))

    async def push_manifest(self, ref: ImageReference, body: bytes, media_type: str) -> str:
        what = f"push of manifest {ref}"
        await self._bounded("PUT", ref, f"{self._base(ref)}/manifests/{ref.reference}", what=what, ok=(200, 201),
                            read=self._discard(ref, what), headers={"Content-Type": media_type}, body=body, push=True)
        return sha256_digest(body)

    def _discard(self, ref: ImageReference, what: str) -> Callable[[aiohttp.ClientResponse], Awaitable[str]]:
        """A `read` for control requests: the Location header; the (small) body is read and dropped."""
        async def read(resp: aiohttp.ClientResponse) -> str:
            location = resp.headers.get("Location", "")
            await self._read_limited(resp, MAX_ERROR_BODY_BYTES, ref, what)
            return location
        return read

    # ---- blobs ---------------------------------------------------------------------------

    async def blob_size(self, ref: ImageReference, digest: str) -> int | None:
        """The blob's size from a HEAD request; None when the registry does not have it."""
        what = f"blob {digest} in {ref.registry}/{ref.repository}"

        async def read(resp: aiohttp.ClientResponse) -> int | None:
            resp.close()  # a HEAD answer has no body: whatever a server sends after it is not for us
            if resp.status == 404:
                return None
            size = _content_length(resp)
            if size is None:
                self.faults["bad_length"] += 1
                raise RegistryError(f"{what}: registry {ref.registry} answered HEAD without a valid Content-Length")
            if size >= MAX_BLOB_BYTES:
                self.faults["oversized"] += 1
                raise RegistryError(f"{what}: registry {ref.registry} claims {size} bytes, above the 1 TiB limit")
            return size

        return await self._bounded("HEAD", ref, f"{self._base(ref)}/blobs/{digest}", what=what, ok=(200, 404), read=read)

    async def get_blob_bytes(self, ref: ImageReference, digest: str, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
        """A small blob (a config) read whole, within the deadline, at most `max_bytes`, verified."""
        what = f"blob {digest} in {ref.registry}/{ref.repository}"

        async def read(resp: aiohttp.ClientResponse) -> bytes:
            return await self._read_limited(resp, max_bytes, ref, what)

        data = await self._bounded("GET", ref, f"{self._base(ref)}/blobs/{digest}", what=what, ok=(200,), read=read)
        actual = sha256_digest(data)
        if actual != digest:
            self.faults["digest"] += 1
            raise DigestMismatchError(f"{what} is truncated or corrupt: {len(data)} bytes hash to {actual}")
        return data

    async def stream_blob(self, ref: ImageReference, digest: str, chunk_bytes: int = 1 << 20,
                          size: int | None = None) -> AsyncIterator[bytes]:
        """The whole blob in blocks, at most `size` bytes (its descriptor's) or 1 TiB. A dropped or
        stalled connection resumes with a Range request; the digest is checked at the end and
        `DigestMismatchError` means the blob was truncated or corrupt."""
        what = f"blob {digest} in {ref.registry}/{ref.repository}"
        limit = size if size is not None else MAX_BLOB_BYTES - 1
        check = DigestWriter()
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            headers = {"Range": f"bytes={check.size}-"} if check.size else {}
            started_at = check.size
            resp = await self._stream_start(ref, digest, what, headers)
            skip = check.size if resp.status == 200 else 0  # server ignored Range: drop what we have
            announced = _content_length(resp)
            if announced is not None and announced - skip + check.size > limit:
                raise self._oversized(resp, ref, what, limit, announced)
            try:
                async with resp:
                    window_start, window_bytes = loop.time(), 0
                    async for block in resp.content.iter_chunked(chunk_bytes):
                        now = loop.time()
                        window_bytes += len(block)
                        if now - window_start >= self._config.read_timeout_s:
                            if window_bytes < self._config.min_speed_bytes_s * (now - window_start):
                                raise _Stall(f"slower than {self._config.min_speed_bytes_s} bytes/s "
                                             f"(registry.min_speed_bytes_s)")
                            window_start, window_bytes = now, 0
                        if skip:
                            cut = min(skip, len(block))
                            block, skip = block[cut:], skip - cut
                            if not block:
                                continue
                        if check.size + len(block) > limit:
                            raise self._oversized(resp, ref, what, limit)
                        check.update(block)
                        yield block
                break
            except _NET_ERRORS as exc:
                kind, reason = self._classify(exc, ref)
                self.faults[kind] += 1
                if check.size - started_at >= _RESET_AFTER_BYTES:
                    failures = 0
                failures += 1
                tries = _Tries(self._config.retries, None, failures - 1)
                if kind in _FINAL_KINDS or not await self._pause(tries, ref, kind):
                    raise RegistryUnreachableError(f"{what}: download kept failing: {reason}") from None
                log.debug("blob_download_resumed", registry=ref.registry, digest=digest, offset=check.size, fault=kind)
        if size is not None and check.size != size:
            self.faults["truncated"] += 1
            raise DigestMismatchError(f"{what} is truncated: {check.size} bytes, its descriptor says {size}")
        if check.digest != digest:
            self.faults["digest"] += 1
            raise DigestMismatchError(f"{what} is truncated or corrupt: {check.size} bytes hash to {check.digest}")

    async def _stream_start(self, ref: ImageReference, digest: str, what: str,
                            headers: dict[str, str]) -> aiohttp.ClientResponse:
        """The response of a blob download, headers received within the deadline; the body is the caller's."""
        async def keep(resp: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
            return resp

        return await self._bounded("GET", ref, f"{self._base(ref)}/blobs/{digest}", what=what, ok=(200, 206),
                                   read=keep, headers=headers)

    async def read_range(self, ref: ImageReference, digest: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a blob in one request: never more, fewer only at its end."""
        what = f"blob {digest} in {ref.registry}/{ref.repository}"
        if length <= 0:
            return b""
        if offset < 0 or length > MAX_RANGE_BYTES:
            raise FormatError(f"{what}: refusing to read {length} bytes at offset {offset} in one range")

        async def read(resp: aiohttp.ClientResponse) -> bytes:
            if resp.status == 206:
                start = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-", 1)[0]
                if start.isdigit() and int(start) != offset:
                    resp.close()
                    self.faults["bad_range"] += 1
                    raise RegistryError(f"{what}: registry {ref.registry} answered a range from {start}, not {offset}")
                return await self._read_limited(resp, length, ref, what, asked=True)
            total = _content_length(resp)
            if total is None or total > MAX_IGNORED_RANGE_BYTES:
                resp.close()
                self.faults["no_range"] += 1
                raise RegistryError(f"{what}: {ref.registry} ignores HTTP Range requests")
            return (await self._read_limited(resp, total, ref, what))[offset:offset + length]

        return await self._bounded("GET", ref, f"{self._base(ref)}/blobs/{digest}", what=what, ok=(200, 206),
                                   read=read, headers={"Range": f"bytes={offset}-{offset + length - 1}"})

    # ---- pushes --------------------------------------------------------------------------

    async def _start_upload(self, ref: ImageReference, digest: str, mount_from: ImageReference | None) -> str | None:
        """Begin an upload; None when a cross-repository mount already made the blob exist."""
        what = f"upload to {ref.registry}/{ref.repository}"
        url = f"{self._base(ref)}/blobs/uploads/"
        extra = ""
        if mount_from is not None and mount_from.registry == ref.registry and mount_from.repository != ref.repository:
            url += "?" + urlencode({"mount": digest, "from": mount_from.repository})
            extra = f"repository:{mount_from.repository}:pull"
        discard = self._discard(ref, what)

        async def read(resp: aiohttp.ClientResponse) -> tuple[int, str]:
            return resp.status, await discard(resp)

        status, location = await self._bounded("POST", ref, url, what=what, ok=(201, 202), read=read, push=True,
                                               extra_scope=extra)
        if status == 201:
            return None
        if not location:
            raise RegistryError(f"{what}: {ref.registry} started an upload without a Location")
        return urljoin(url, location)

    async def _send(self, ref: ImageReference, method: str, url: str, body: bytes, headers: dict[str, str],
                    ok: tuple[int, ...]) -> str:
        what = f"upload to {ref.registry}/{ref.repository}"
        # the body must go out at no less than the minimum speed, on top of the usual deadline
        seconds = self._config.request_deadline_s + len(body) / self._config.min_speed_bytes_s
        location = await self._bounded(method, ref, url, what=what, ok=ok, read=self._discard(ref, what),
                                       headers=headers, body=body, push=True, retries=0, deadline_s=seconds)
        return urljoin(url, location or url)

    async def _upload(self, ref: ImageReference, digest: str, size: int, read: Callable[[int, int], bytes],
                      mount_from: ImageReference | None) -> bool:
        location = await self._start_upload(ref, digest, mount_from)
        if location is None:
            return True
        step = self._config.upload_chunk_bytes
        offset = 0
        while offset < size:
            piece = await asyncio.to_thread(read, offset, min(step, size - offset))
            if not piece:
                raise FormatError(f"blob {digest}: its source ended at {offset} of {size} bytes")
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Range": f"{offset}-{offset + len(piece) - 1}"}
            location = await self._send(ref, "PATCH", location, piece, headers, (202,))
            offset += len(piece)
        sep = "&" if "?" in location else "?"
        await self._send(ref, "PUT", f"{location}{sep}{urlencode({'digest': digest})}", b"",
                         {"Content-Type": "application/octet-stream"}, (201,))
        return True

    async def _upload_with_retries(self, ref: ImageReference, digest: str, size: int,
                                   read: Callable[[int, int], bytes], mount_from: ImageReference | None) -> bool:
        have = await self.blob_size(ref, digest)
        if have is not None:
            if have != size:
                self.faults["size_mismatch"] += 1
                raise RegistryError(f"registry {ref.registry} has blob {digest} with {have} bytes, "
                                    f"not {size}: the registry is inconsistent")
            return False
        tries = _Tries(self._config.retries, None)
        while True:
            try:
                return await self._upload(ref, digest, size, read, mount_from)
            except RegistryError as exc:
                # an upload is not idempotent mid-way: start it again from the beginning
                if isinstance(exc, (AuthError, NotFoundError)) or not await self._pause(tries, ref, "upload"):
                    raise
                log.debug("blob_upload_restarted", registry=ref.registry, digest=digest, error=str(exc))

    async def push_blob_file(self, ref: ImageReference, digest: str, path: Path, size: int,
                             mount_from: ImageReference | None = None) -> bool:
        """Upload a blob from a file; False when the registry already had it."""
        def read(offset: int, length: int) -> bytes:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(length)

        return await self._upload_with_retries(ref, digest, size, read, mount_from)

    async def push_blob_bytes(self, ref: ImageReference, data: bytes) -> str:
        digest = sha256_digest(data)
        await self._upload_with_retries(ref, digest, len(data), lambda o, n: data[o:o + n], None)
        return digest


def _human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"
