"""Where an image to convert comes from: a registry, or an OCI image layout directory.

Both sources give the same three things: the image manifest (an index already resolved to one
platform), small blobs in memory, and large blobs as a verified stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from converter.format import untrusted
from converter.format.digest import DigestWriter, parse_digest, sha256_digest
from converter.format.errors import ConfigError, DigestMismatchError, FormatError, NotFoundError, UnsupportedError
from converter.registry import media_types as mt
from converter.registry.client import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, FetchedManifest, RegistryClient
from converter.registry.config import DEFAULT_PLATFORM
from converter.registry.manifest import check_descriptor, parse_manifest
from converter.registry.platform import check_config_platform, describe, matches
from converter.registry.reference import ImageReference

LAYOUT_PREFIX = "oci:"


@dataclass(frozen=True)
class ResolvedImage:
    manifest: dict[str, Any]
    body: bytes
    media_type: str
    digest: str


class ImageSource(Protocol):
    description: str
    registry_ref: ImageReference | None  # set when blobs can be cross-repo mounted from here

    async def resolve(self) -> ResolvedImage: ...

    async def read_blob(self, digest: str, max_bytes: int = MAX_CONFIG_BYTES) -> bytes: ...

    def stream_blob(self, digest: str, size: int | None = None) -> AsyncIterator[bytes]: ...


def _annotations(desc: dict[str, Any]) -> dict[str, Any]:
    annotations = desc.get("annotations")
    return annotations if isinstance(annotations, dict) else {}


class RegistrySource:
    def __init__(self, client: RegistryClient, ref: ImageReference) -> None:
        self._client = client
        self.registry_ref = ref
        self.description = str(ref)

    async def resolve(self) -> ResolvedImage:
        fetched, _index = await self._client.resolve_image(self.registry_ref)
        return _resolved(fetched, self.description)

    async def read_blob(self, digest: str, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
        return await self._client.get_blob_bytes(self.registry_ref, digest, max_bytes=max_bytes)

    def stream_blob(self, digest: str, size: int | None = None) -> AsyncIterator[bytes]:
        return self._client.stream_blob(self.registry_ref, digest, size=size)


def _resolved(fetched: FetchedManifest, what: str) -> ResolvedImage:
    return ResolvedImage(parse_manifest(fetched.body, fetched.media_type, what), fetched.body, fetched.media_type, fetched.digest)


class LayoutSource:
    """An OCI image layout directory (`oci:DIR[:TAG]`), as written by skopeo, umoci or buildkit.

    Every descriptor's size must be its blob's size: a layout that lies is refused before any work."""

    registry_ref = None

    def __init__(self, root: Path, tag: str | None, platform: str) -> None:
        self._root = root
        self._tag = tag
        self._platform = platform  # "": linux/amd64 from an index, a single image as it is
        self.description = f"{LAYOUT_PREFIX}{root}" + (f":{tag}" if tag else "")
        if not (root / "index.json").is_file():
            raise ConfigError(f"{root} is not an OCI image layout (no index.json)")

    def _blob_path(self, digest: str) -> Path:
        algo, _, hexpart = parse_digest(digest).partition(":")
        return self._root / "blobs" / algo / hexpart

    def _check_size(self, desc: dict[str, Any]) -> None:
        try:
            actual = self._blob_path(desc["digest"]).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"{self.description}: blob {desc['digest']} is missing") from None
        if actual != desc["size"]:
            raise FormatError(f"{self.description}: descriptor of {desc['digest']} says {desc['size']} bytes, "
                              f"the blob has {actual}")

    async def read_blob(self, digest: str, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
        path = self._blob_path(digest)
        try:
            if path.stat().st_size > max_bytes:
                raise FormatError(f"{self.description}: blob {digest} is larger than {max_bytes} bytes")
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{self.description}: blob {digest} is missing") from None
        if sha256_digest(data) != digest:
            raise DigestMismatchError(f"{self.description}: blob {digest} is corrupt")
        return data

    async def stream_blob(self, digest: str, size: int | None = None) -> AsyncIterator[bytes]:  # type: ignore[override]
        path = self._blob_path(digest)
        check = DigestWriter()
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{self.description}: blob {digest} is missing") from None
        with f:
            while block := f.read(1 << 20):
                check.update(block)
                yield block
        if check.digest != digest or (size is not None and check.size != size):
            raise DigestMismatchError(f"{self.description}: blob {digest} is truncated or corrupt")

    def _descriptors(self, doc: Any, where: str) -> list[dict[str, Any]]:
        manifests = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(manifests, list):
            raise FormatError(f"{self.description}: {where}'s 'manifests' is not a list")
        for desc in manifests:
            check_descriptor(desc, f"{self.description}: {where}")
        return manifests

    def _pick(self, descriptors: list[dict[str, Any]], what: str) -> dict[str, Any]:
        if self._tag is not None:
            tagged = [d for d in descriptors if _annotations(d).get("org.opencontainers.image.ref.name") == self._tag]
            if not tagged:
                raise NotFoundError(f"{what}: no image tagged {self._tag!r}")
            descriptors = tagged
        if not descriptors:
            raise NotFoundError(f"{what}: the layout holds no image")
        if len(descriptors) == 1:
            return descriptors[0]
        wanted = self._platform or DEFAULT_PLATFORM
        for d in descriptors:
            if matches(d.get("platform") or {}, wanted):
                return d
        have = ", ".join(sorted({describe(d.get("platform") or {}) for d in descriptors}))
        raise NotFoundError(f"{what}: {len(descriptors)} images and none for {wanted} (it has: {have}); "
                            "name a tag or choose one with --platform")

    async def resolve(self) -> ResolvedImage:
        try:
            index = untrusted.loads((self._root / "index.json").read_bytes())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{self.description}: index.json is unreadable or not JSON ({type(exc).__name__})") from None
        chosen = self._pick(self._descriptors(index, "index.json"), self.description)
        for _ in range(4):  # an index may point at a nested index
            self._check_size(chosen)
            body = await self.read_blob(chosen["digest"], max_bytes=MAX_MANIFEST_BYTES)
            media_type = chosen.get("mediaType", "")
            if media_type in (mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST):
                self._tag = None
                try:
                    nested = untrusted.loads(body)
                except ValueError:
                    raise FormatError(f"{self.description}: index {chosen['digest']} is not JSON") from None
                chosen = self._pick(self._descriptors(nested, f"index {chosen['digest']}"), self.description)
                continue
            image = _resolved(FetchedManifest(media_type, body, chosen["digest"]), self.description)
            for desc in [image.manifest["config"], *image.manifest["layers"]]:
                self._check_size(desc)
            platform = chosen.get("platform")
            if self._platform and isinstance(platform, dict):
                if not matches(platform, self._platform):
                    raise UnsupportedError(f"{self.description} has no image for {self._platform} "
                                           f"(it has: {describe(platform)}); choose one of those with --platform")
            elif self._platform:
                check_config_platform(await self.read_blob(image.manifest["config"]["digest"]), self._platform,
                                      self.description)
            return image
        raise FormatError(f"{self.description}: indexes nested too deeply")


def open_source(text: str, client: RegistryClient, platform: str) -> ImageSource:
    """`oci:DIR[:TAG]` or an existing directory → layout source; anything else → registry reference."""
    if text.startswith(LAYOUT_PREFIX):
        path, tag = text[len(LAYOUT_PREFIX):], ""
        if not os.path.isdir(path) and ":" in path:  # oci:DIR:TAG
            path, _, tag = path.rpartition(":")
        return LayoutSource(Path(path), tag or None, platform)
    if os.path.isdir(text):
        return LayoutSource(Path(text), None, platform)
    return RegistrySource(client, ImageReference.parse(text))
