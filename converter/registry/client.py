"""OCI Distribution v2 client on one aiohttp session: manifests, blobs, Range reads, pushes.

Hand-written (see auth.py for why). Every request retries with exponential backoff on 429/5xx
and connection errors; failures become one-line errors from the project's taxonomy.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import AsyncIterator, Callable
from urllib.parse import urlencode, urljoin

import aiohttp
import structlog

from converter.digest import DigestWriter, sha256_digest, verify_bytes
from converter.errors import (AuthError, DigestMismatchError, FormatError, NotFoundError, RegistryError,
                              RegistryUnreachableError, UnsupportedError)
from converter.registry import media_types as mt
from converter.registry.auth import Authenticator
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference

log = structlog.get_logger(__name__)
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class FetchedManifest:
    media_type: str
    body: bytes
    digest: str


def _error_detail(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errors[:2])
    except (ValueError, AttributeError, TypeError):
        return ""


class RegistryClient:
    def __init__(self, config: RegistryConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self._auth: Authenticator | None = None

    async def __aenter__(self) -> "RegistryClient":
        timeout = aiohttp.ClientTimeout(total=None, connect=self._config.connect_timeout_s,
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

    async def _backoff(self, attempt: int, retry_after: str | None = None) -> None:
        delay = self._config.backoff_base_s * (2 ** attempt)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(float(retry_after), 30.0))
        await asyncio.sleep(delay)

    async def _request(
        self, method: str, ref: ImageReference, url: str, *, what: str, headers: dict[str, str] | None = None,
        body: bytes | None = None, push: bool = False, extra_scope: str = "", retries: int | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one request (with auth and retries); the caller owns and must release the response."""
        assert self._session is not None and self._auth is not None, "use RegistryClient as an async context manager"
        scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}" + (f" {extra_scope}" if extra_scope else "")
        retries = self._config.retries if retries is None else retries
        attempt, authed = 0, False
        while True:
            hdrs = dict(headers or {})
            if (auth := self._auth.header(ref.registry, scope)) is not None:
                hdrs["Authorization"] = auth
            try:
                resp = await self._session.request(method, url, headers=hdrs, data=body)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                if attempt >= retries:
                    os_error = getattr(exc, "os_error", None)
                    reason = (os_error.strerror if os_error is not None and os_error.strerror else str(exc)) or type(exc).__name__
                    raise RegistryUnreachableError(f"cannot reach registry {ref.registry}: {reason}") from None
                log.debug("registry_retry", registry=ref.registry, error=type(exc).__name__, attempt=attempt + 1)
                await self._backoff(attempt)
                attempt += 1
                continue
            if resp.status == 401 and not authed:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                authed = True
                if await self._auth.answer(ref.registry, scope, challenge, hdrs.get("Authorization")):
                    continue
                raise AuthError(f"{what}: {ref.registry} requires authentication; {self._auth.describe(ref.registry)}")
            if resp.status in _RETRY_STATUS and attempt < retries:
                retry_after = resp.headers.get("Retry-After")
                resp.release()
                log.debug("registry_retry", registry=ref.registry, status=resp.status, attempt=attempt + 1)
                await self._backoff(attempt, retry_after)
                attempt += 1
                continue
            return resp

    async def _fail(self, resp: aiohttp.ClientResponse, ref: ImageReference, what: str) -> RegistryError:
        try:
            body = await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        resp.release()
        detail = _error_detail(body)
        suffix = f" ({detail})" if detail else ""
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
        resp = await self._request("GET", ref, f"{self._base(ref)}/manifests/{ref.reference}", what=what,
                                   headers={"Accept": mt.ACCEPT_MANIFESTS})
        if resp.status != 200:
            raise await self._fail(resp, ref, what)
        async with resp:
            body = await resp.read()
        if len(body) > 8 << 20:
            raise FormatError(f"{what}: manifest larger than 8 MiB")
        if ref.digest:
            verify_bytes(body, ref.digest, what)
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            media_type = json.loads(body).get("mediaType") or media_type
        except (ValueError, AttributeError):
            raise FormatError(f"{what}: not valid JSON") from None
        return FetchedManifest(media_type, body, sha256_digest(body))

    async def resolve_image(self, ref: ImageReference) -> tuple[FetchedManifest, FetchedManifest | None]:
        fetched = await self.get_manifest(ref)
        if fetched.media_type not in mt.INDEX_TYPES:
            return fetched, None
        entries = json.loads(fetched.body).get("manifests") or []
        os_, _, arch_variant = self._config.platform.partition("/")
        arch, _, variant = arch_variant.partition("/")
        for entry in entries:
            p = entry.get("platform") or {}
            if p.get("os") == os_ and p.get("architecture") == arch and (not variant or p.get("variant") == variant):
                return await self.get_manifest(ref.with_digest(entry["digest"])), fetched
        have = ", ".join(sorted({f"{(e.get('platform') or {}).get('os')}/{(e.get('platform') or {}).get('architecture')}"
                                 for e in entries}))
        raise UnsupportedError(f"{ref} has no image for {self._config.platform} (it has: {have or 'none'})")

    async def push_manifest(self, ref: ImageReference, body: bytes, media_type: str) -> str:
        what = f"push of manifest {ref}"
        resp = await self._request("PUT", ref, f"{self._base(ref)}/manifests/{ref.reference}", what=what,
                                   headers={"Content-Type": media_type}, body=body, push=True)
        if resp.status not in (200, 201):
            raise await self._fail(resp, ref, what)
        resp.release()
        return sha256_digest(body)

    # ---- blobs ---------------------------------------------------------------------------

    async def blob_size(self, ref: ImageReference, digest: str) -> int | None:
        what = f"blob {digest} in {ref.registry}/{ref.repository}"
        resp = await self._request("HEAD", ref, f"{self._base(ref)}/blobs/{digest}", what=what)
        resp.release()
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise await self._fail(resp, ref, what)
        return int(resp.headers.get("Content-Length", "0"))

    async def get_blob_bytes(self, ref: ImageReference, digest: str, max_bytes: int = 64 << 20) -> bytes:
        what = f"blob {digest} in {ref.registry}/{ref.repository}"
        parts: list[bytes] = []
        size = 0
        async for block in self.stream_blob(ref, digest):
            size += len(block)
            if size > max_bytes:
                raise FormatError(f"{what} is larger than {max_bytes} bytes")
            parts.append(block)
        return b"".join(parts)

    async def stream_blob(self, ref: ImageReference, digest: str, chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
        """The whole blob in blocks. A dropped connection resumes with a Range request; the digest
        is checked at the end and `DigestMismatchError` means the blob was truncated or corrupt."""
        what = f"blob {digest} in {ref.registry}/{ref.repository}"
        check = DigestWriter()
        failures = 0
        while True:
            headers = {"Range": f"bytes={check.size}-"} if check.size else {}
            resp = await self._request("GET", ref, f"{self._base(ref)}/blobs/{digest}", what=what, headers=headers)
            if resp.status not in (200, 206):
                raise await self._fail(resp, ref, what)
            skip = check.size if resp.status == 200 else 0  # server ignored Range: drop what we have
            try:
                async with resp:
                    async for block in resp.content.iter_chunked(chunk_bytes):
                        if skip:
                            cut = min(skip, len(block))
                            block, skip = block[cut:], skip - cut
                            if not block:
                                continue
                        check.update(block)
                        yield block
                break
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                failures += 1
                if failures > self._config.retries:
                    raise RegistryUnreachableError(f"{what}: download kept failing ({type(exc).__name__})") from None
                log.debug("blob_download_resumed", registry=ref.registry, digest=digest, offset=check.size,
                         error=type(exc).__name__)
                await self._backoff(failures - 1)
        if check.digest != digest:
            raise DigestMismatchError(f"{what} is truncated or corrupt: {check.size} bytes hash to {check.digest}")

    async def read_range(self, ref: ImageReference, digest: str, offset: int, length: int) -> bytes:
        what = f"blob {digest} in {ref.registry}/{ref.repository}"
        if length <= 0:
            return b""
        resp = await self._request("GET", ref, f"{self._base(ref)}/blobs/{digest}", what=what,
                                   headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        if resp.status == 200:
            total = int(resp.headers.get("Content-Length", "-1"))
            if not 0 <= total <= 16 << 20:
                resp.release()
                raise RegistryError(f"{what}: {ref.registry} ignores HTTP Range requests")
        elif resp.status != 206:
            raise await self._fail(resp, ref, what)
        try:
            async with resp:
                data = await resp.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise RegistryUnreachableError(f"{what}: range read failed ({type(exc).__name__})") from None
        return data[offset:offset + length] if resp.status == 200 else data

    # ---- pushes --------------------------------------------------------------------------

    async def _start_upload(self, ref: ImageReference, digest: str, mount_from: ImageReference | None) -> str | None:
        """Begin an upload; None when a cross-repository mount already made the blob exist."""
        what = f"upload to {ref.registry}/{ref.repository}"
        url = f"{self._base(ref)}/blobs/uploads/"
        extra = ""
        if mount_from is not None and mount_from.registry == ref.registry and mount_from.repository != ref.repository:
            url += "?" + urlencode({"mount": digest, "from": mount_from.repository})
            extra = f"repository:{mount_from.repository}:pull"
        resp = await self._request("POST", ref, url, what=what, push=True, extra_scope=extra)
        if resp.status == 201:
            resp.release()
            return None
        if resp.status != 202 or "Location" not in resp.headers:
            raise await self._fail(resp, ref, what)
        resp.release()
        return urljoin(url, resp.headers["Location"])

    async def _send(self, ref: ImageReference, method: str, url: str, body: bytes, headers: dict[str, str],
                    ok: tuple[int, ...]) -> str:
        what = f"upload to {ref.registry}/{ref.repository}"
        resp = await self._request(method, ref, url, what=what, headers=headers, body=body, push=True, retries=0)
        if resp.status not in ok:
            raise await self._fail(resp, ref, what)
        resp.release()
        return urljoin(url, resp.headers.get("Location", url))

    async def _upload(self, ref: ImageReference, digest: str, size: int, read: Callable[[int, int], bytes],
                      mount_from: ImageReference | None) -> bool:
        location = await self._start_upload(ref, digest, mount_from)
        if location is None:
            return True
        step = self._config.upload_chunk_bytes
        offset = 0
        while offset < size:
            piece = await asyncio.to_thread(read, offset, min(step, size - offset))
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
        if await self.blob_size(ref, digest) is not None:
            return False
        for attempt in range(self._config.retries + 1):
            try:
                return await self._upload(ref, digest, size, read, mount_from)
            except (RegistryUnreachableError, RegistryError) as exc:
                # an upload is not idempotent mid-way: start it again from the beginning
                if isinstance(exc, (AuthError, NotFoundError)) or attempt == self._config.retries:
                    raise
                log.debug("blob_upload_restarted", registry=ref.registry, digest=digest, error=str(exc))
                await self._backoff(attempt)
        raise AssertionError("unreachable")

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

