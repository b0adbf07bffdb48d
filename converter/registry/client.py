"""OCI Distribution v2 client: manifests, blobs, Range reads, pushes (on RegistryTransport).

Hand-written (see auth.py for why). Limits: manifests and indexes 4 MiB (containerd's limit),
configs 8 MiB, ranges exactly the bytes asked for, whole-blob downloads their descriptor's size
(never 1 TiB or more), HEAD sizes below 1 TiB. Bounded operations finish within the deadline;
whole-blob downloads resume after a drop or a stall instead (see RegistryConfig and transport.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urljoin

import aiohttp

from converter.format import untrusted
from converter.format.digest import DigestWriter, is_digest, sha256_digest, verify_bytes
from converter.format.errors import (
    AuthError,
    DigestMismatchError,
    FormatError,
    NotFoundError,
    RegistryError,
    RegistryUnreachableError,
    UnsupportedError,
)
from converter.registry import media_types as mt
from converter.registry.platform import check_config_platform, describe, matches
from converter.registry.reference import ImageReference
from converter.registry.transport import (
    _FINAL_KINDS,
    _NET_ERRORS,
    _RESET_AFTER_BYTES,
    MAX_BLOB_BYTES,
    MAX_CONFIG_BYTES,
    MAX_ERROR_BODY_BYTES,
    MAX_IGNORED_RANGE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_RANGE_BYTES,
    RegistryTransport,
    _content_length,
    _Stall,
    _Tries,
    log,
)

__all__ = ["FetchedManifest", "RegistryClient", "MAX_BLOB_BYTES", "MAX_CONFIG_BYTES", "MAX_ERROR_BODY_BYTES",
           "MAX_MANIFEST_BYTES", "MAX_RANGE_BYTES"]


@dataclass(frozen=True)
class FetchedManifest:
    media_type: str
    body: bytes
    digest: str



LocalContent = Callable[[str, int], Awaitable[bytes | None]]  # (digest, max bytes) → the blob held locally


class RegistryClient(RegistryTransport):
    """`async with RegistryClient(config) as client:` one session for every registry it talks to;
    `client.faults` counts registry faults by kind (for peerpull's metrics)."""

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

    async def manifest_digest(self, ref: ImageReference) -> str | None:
        """What a tag points at now (a HEAD, its Docker-Content-Digest), None when the registry does not say."""
        what = f"manifest {ref}"

        async def read(resp: aiohttp.ClientResponse) -> str | None:
            resp.close()  # a HEAD answer has no body
            digest = resp.headers.get("Docker-Content-Digest", "")
            return digest if is_digest(digest) else None

        return await self._bounded("HEAD", ref, f"{self._base(ref)}/manifests/{ref.reference}", what=what, ok=(200,),
                                   read=read, headers={"Accept": mt.ACCEPT_MANIFESTS})

    async def _manifest(self, ref: ImageReference, local: LocalContent | None, head_tag: bool) -> FetchedManifest:
        """A manifest from `local` (content-addressed: checked by digest) when it holds it, else the registry.
        A tag is first resolved with a HEAD when head_tag (the node pulled it before), else fetched whole."""
        if local is not None and (ref.digest or head_tag):
            digest = ref.digest or await self.manifest_digest(ref)
            body = await local(digest, MAX_MANIFEST_BYTES) if digest else None
            if body is not None and sha256_digest(body) == digest:
                try:
                    doc = untrusted.loads(body)
                except (ValueError, UnicodeDecodeError):
                    doc = None
                if isinstance(doc, dict):
                    kind = doc.get("mediaType") or (mt.OCI_INDEX if "manifests" in doc else mt.OCI_MANIFEST)
                    return FetchedManifest(kind, body, digest)
        return await self.get_manifest(ref)

    async def resolve_image(self, ref: ImageReference, local: LocalContent | None = None,
                            head_tag: bool = False) -> tuple[FetchedManifest, FetchedManifest | None]:
        """The image manifest of `ref` for the configured platform, and the index it came from (if any).

        With an explicitly configured platform, a single-platform image must be of that platform.
        `local(digest, max_bytes)` is content the node already holds (containerd's content store):
        manifests and the platform check's config found there are not fetched again."""
        fetched = await self._manifest(ref, local, head_tag)
        if fetched.media_type not in mt.INDEX_TYPES:
            if self._config.platform:
                await self._check_platform(ref, fetched, local)
            return fetched, None
        entries = untrusted.loads(fetched.body).get("manifests")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise FormatError(f"index {ref}: 'manifests' is not a list of descriptors")
        wanted = self._config.index_platform
        for entry in entries:
            if matches(entry.get("platform") or {}, wanted) and is_digest(entry.get("digest")):
                return await self._manifest(ref.with_digest(entry["digest"]), local, False), fetched
        have = ", ".join(sorted({describe(e.get("platform") or {}) for e in entries}))
        raise UnsupportedError(f"{ref} has no image for {wanted} (it has: {have or 'none'}); "
                               "choose one of those with --platform")

    async def _check_platform(self, ref: ImageReference, fetched: FetchedManifest, local: LocalContent | None) -> None:
        try:
            config = untrusted.loads(fetched.body).get("config") or {}
            digest = config["digest"]
        except (ValueError, AttributeError, KeyError, TypeError):
            return  # not an image manifest: the caller says so
        held = await local(digest, MAX_CONFIG_BYTES) if local is not None and is_digest(digest) else None
        config = held if held is not None and sha256_digest(held) == digest else await self.get_blob_bytes(ref, digest)
        check_config_platform(config, self._config.platform, str(ref))

    async def push_manifest(self, ref: ImageReference, body: bytes, media_type: str) -> str:
        what = f"push of manifest {ref}"
        await self._bounded("PUT", ref, f"{self._base(ref)}/manifests/{ref.reference}", what=what, ok=(200, 201),
                            read=self._discard(ref, what), headers={"Content-Type": media_type}, body=body, push=True)
        return sha256_digest(body)

    async def put_manifest(self, ref: ImageReference, body: bytes, media_type: str) -> tuple[str, bool]:
        """Push a manifest; (its digest, whether the registry says it indexed the manifest's
        `subject`: the `OCI-Subject` answer header of registries with the referrers API)."""
        what = f"push of manifest {ref}"
        discard = self._discard(ref, what)

        async def read(resp: aiohttp.ClientResponse) -> bool:
            subject = "OCI-Subject" in resp.headers
            await discard(resp)
            return subject

        indexed = await self._bounded("PUT", ref, f"{self._base(ref)}/manifests/{ref.reference}", what=what,
                                      ok=(200, 201), read=read, headers={"Content-Type": media_type}, body=body,
                                      push=True)
        return sha256_digest(body), indexed

    async def get_referrers(self, ref: ImageReference, digest: str, artifact_type: str = "") -> bytes | None:
        """The referrers API's image index for `digest` (filtered by `artifact_type` where the
        registry filters); None when the registry has no referrers API (it answers 404)."""
        what = f"referrers of {digest} in {ref.registry}/{ref.repository}"
        query = f"?{urlencode({'artifactType': artifact_type})}" if artifact_type else ""

        async def read(resp: aiohttp.ClientResponse) -> bytes | None:
            if resp.status == 404:
                await self._read_limited(resp, MAX_ERROR_BODY_BYTES, ref, what)
                return None
            return await self._read_limited(resp, MAX_MANIFEST_BYTES, ref, what)

        return await self._bounded("GET", ref, f"{self._base(ref)}/referrers/{digest}{query}", what=what,
                                   ok=(200, 404), read=read, headers={"Accept": mt.OCI_INDEX})

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
        return (await self.read_range_pieces(ref, digest, offset, length, [(0, length)]))[0] if length > 0 else b""

    async def read_range_pieces(self, ref: ImageReference, digest: str, offset: int, length: int,
                                pieces: Sequence[tuple[int, int]]) -> list[bytes]:
        """The `pieces` ((start, length) relative to offset, in order, not overlapping, within the
        range) of bytes [offset, offset+length) of a blob, read in one request and cut out as the
        answer arrives: the range is never held whole beside its pieces (a run of frames holds its
        frames only). A piece the body ends before is short (empty if not begun)."""
        what = f"blob {digest} in {ref.registry}/{ref.repository}"
        if length <= 0:
            return [b"" for _ in pieces]
        if offset < 0 or length > MAX_RANGE_BYTES:
            raise FormatError(f"{what}: refusing to read {length} bytes at offset {offset} in one range")

        async def read(resp: aiohttp.ClientResponse) -> list[bytes]:
            if resp.status == 206:
                start = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-", 1)[0]
                if start.isdigit() and int(start) != offset:
                    resp.close()
                    self.faults["bad_range"] += 1
                    raise RegistryError(f"{what}: registry {ref.registry} answered a range from {start}, not {offset}")
                return await self._read_pieces(resp, length, pieces, ref, what)
            total = _content_length(resp)
            if total is None or total > MAX_IGNORED_RANGE_BYTES:
                resp.close()
                self.faults["no_range"] += 1
                raise RegistryError(f"{what}: {ref.registry} ignores HTTP Range requests")
            data = (await self._read_limited(resp, total, ref, what))[offset:offset + length]
            return [data[a:a + n] for a, n in pieces]

        return await self._bounded("GET", ref, f"{self._base(ref)}/blobs/{digest}", what=what, ok=(200, 206),
                                   read=read, headers={"Range": f"bytes={offset}-{offset + length - 1}"})

    async def _read_pieces(self, resp: aiohttp.ClientResponse, limit: int, pieces: Sequence[tuple[int, int]],
                           ref: ImageReference, what: str) -> list[bytes]:
        """A Range body cut into `pieces` block by block, refused past `limit` bytes like _read_limited."""
        announced = _content_length(resp)
        if announced is not None and announced > limit:
            raise self._oversized(resp, ref, what, limit, announced, True)
        out: list[bytes] = []
        current = bytearray()  # the piece being received
        at = 0  # body bytes received so far
        while block := await resp.content.read(1 << 20):
            if at + len(block) > limit:
                raise self._oversized(resp, ref, what, limit, asked=True)
            view = memoryview(block)
            pos = at
            at += len(block)
            while view and len(out) < len(pieces):
                start, size = pieces[len(out)]
                if pos < start:  # bytes between pieces (header frames): dropped
                    skip = min(start - pos, len(view))
                    view, pos = view[skip:], pos + skip
                    continue
                take = view[:start + size - pos]
                current += take
                view, pos = view[len(take):], pos + len(take)
                if len(current) == size:
                    out.append(bytes(current))
                    current = bytearray()
        resp.release()
        if len(out) < len(pieces):
            out.append(bytes(current))
        return out + [b"" for _ in pieces[len(out):]]

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
