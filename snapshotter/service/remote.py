"""Which layers are served lazily, and their TOCs.

A layer qualifies when containerd's labels name it (`cri.layer-digest`) and the image it came
from (`cri.image-ref`), and the registry has it as a seekable blob. With the manifest digest
label, the manifest is fetched by digest and its annotations must announce the TOC, whose
digest is then checked: the chain of trust runs from the digest containerd resolved down to
every chunk. TOCs are kept on disk, so a restarted daemon serves its layers without the network;
a TOC on disk that no longer reads is fetched again (from the image its snapshots name).

With `defer_build` (snapshotter.defer_tree_build), a layer whose TOC digest the manifest vouches
for is answered as soon as its TOC is on disk; its tree is built in the background (tree_builds.py)
and whatever mounts a snapshot on top of it waits for that build (`ready`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import structlog

from converter.format import toc as fmt
from converter.format.digest import is_digest, sha256_digest
from converter.format.errors import (
    FormatError,
    NoFooterError,
    NotSeekableError,
    PeerpullError,
    RegistryNotFoundError,
)
from converter.format.layer_reader import TocLocation, location_from_annotations, read_toc_frame
from converter.registry.blob_reader import RegistryBlobReader
from converter.registry.client import RegistryClient
from converter.registry.reference import ImageReference
from peer.policy import registry_of
from peer.singleflight import SingleFlight
from snapshotter.fs.file_reader import LayerSource
from snapshotter.fs.fusefs import LayerFS
from snapshotter.service import layer_build
from snapshotter.service.image_fetch import ImageFetch
from snapshotter.service.store import LayerRecord, SnapshotStore
from snapshotter.service.tree_builds import TreeBuilds

log = structlog.get_logger(__name__)

LABEL_TARGET = "containerd.io/snapshot.ref"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"  # this layer's digest and those above it
LABEL_REMOTE = "containerd.io/snapshot/peerpull.remote"  # set on snapshots we serve lazily
MANIFESTS_KEPT = 256  # image manifests kept on disk (by digest) for a restart


class RemoteLayers:
    def __init__(self, root: Path, store: SnapshotStore, fs: LayerFS, client: RegistryClient, prefetch: str,
                 trust_registry: Callable[[str], None] = lambda registry: None,
                 image_fetch: ImageFetch | None = None, defer_build: bool = True) -> None:
        self._dir = root / "layers"
        # the registries this node's own containerd pulls from: the peer node may fetch from them
        # when another node asks (and from no other, unless configured)
        self._trust_registry = trust_registry
        self._dir.mkdir(parents=True, exist_ok=True)
        self._manifest_dir = root / "manifests"  # image manifests by digest: a restart needs no registry for them
        self._manifest_dir.mkdir(exist_ok=True)
        self._store = store
        self._fs = fs
        self._client = client
        self._prefetch = prefetch
        self._image_fetch = image_fetch  # what an image brings in at pull time (profile, streaming)
        self._resolving: SingleFlight[LayerRecord] = SingleFlight()
        self._manifests: OrderedDict[str, bytes] = OrderedDict()  # by digest: one fetch per image
        self._manifest_fetch: SingleFlight[bytes] = SingleFlight()  # the layers of a pull ask at once
        self._defer_build = defer_build
        self._builds = TreeBuilds()

    def _toc_path(self, digest: str) -> Path:
        return self._dir / (digest.split(":", 1)[1] + ".toc")

    async def close(self) -> None:
        """End resolutions still running (look-aheads nobody awaits) at shutdown."""
        await self._resolving.close()
        await self._manifest_fetch.close()
        await self._builds.close()

    async def ready(self, digests: list[str]) -> None:
        """Until the trees of these layers are built (LayerBuildError if one could not be)."""
        await self._builds.wait(digests)

    def restore(self) -> int:
        """Put every layer recorded before a restart back in the FUSE mount; returns how many.

        A TOC on disk that does not read (truncated, corrupt) is fetched again in the background
        from the image a snapshot of the layer names; snapshots on top of it wait for that."""
        restored = 0
        for record in self._store.layers():
            try:
                toc = self._load_toc(record)
            except (OSError, PeerpullError) as exc:
                self._toc_path(record.digest).unlink(missing_ok=True)
                origin = self._origin(record.digest)
                log.warning("layer_restore_failed", layer=record.digest, error=str(exc),
                            refetch=origin is not None)
                if origin is not None:
                    self._builds.start(record.digest, self._fetch(record.digest, *origin, record, defer=False))
                continue
            self._fs.add_built(layer_build.build_layer(record.digest, record.slot, record.repository, toc))
            self._trust_registry(registry_of(record.repository))
            restored += 1
        return restored

    def _origin(self, digest: str) -> tuple[str, str] | None:
        """(image ref, manifest digest) of an image a snapshot of the layer came from."""
        for snap in self._store.all():
            labels = snap.labels
            if snap.layer == digest and labels.get(LABEL_IMAGE_REF) and is_digest(labels.get(LABEL_MANIFEST_DIGEST, "")):
                return labels[LABEL_IMAGE_REF], labels[LABEL_MANIFEST_DIGEST]
        return None

    def _load_toc(self, record: LayerRecord) -> fmt.Toc:
        data = self._toc_path(record.digest).read_bytes()
        footer = fmt.decode_footer(data[:fmt.FOOTER_SIZE], record.size)
        return layer_build.parse_toc(data[fmt.FOOTER_SIZE:], footer)

    async def resolve(self, labels: dict[str, str]) -> LayerRecord:
        """The lazily served layer the labels describe, mounted; NotSeekableError for ordinary layers.

        The first layer of an image also starts resolving the layers above it (CRI's
        `cri.image-layers` label lists them), so their Prepare calls find them ready.
        Registry or format failures propagate: the caller logs them and falls back.
        """
        digest = labels.get(LABEL_LAYER_DIGEST, "")
        image_ref = labels.get(LABEL_IMAGE_REF, "")
        if not digest or not image_ref:
            raise NotSeekableError("no layer digest / image reference labels (plain `ctr pull`?)")
        manifest = labels.get(LABEL_MANIFEST_DIGEST, "")
        # digests name files under the root (TOCs): only well-formed ones are used
        if not is_digest(digest) or (manifest and not is_digest(manifest)):
            raise FormatError(f"malformed digest label (layer {digest[:80]!r}, manifest {manifest[:80]!r})")
        fetch = functools.partial(self._resolve, digest, image_ref, manifest)
        self._resolving.start(digest, fetch)
        layers = [digest]
        for above in labels.get(LABEL_IMAGE_LAYERS, "").split(",")[1:]:
            if is_digest(above) and manifest:
                # look-ahead nobody awaits: a failure is dropped here and retried by that layer's Prepare
                self._resolving.start(above, functools.partial(self._resolve, above, image_ref, manifest))
                layers.append(above)
        if self._image_fetch is not None and manifest:
            self._image_fetch.pulled(image_ref, manifest, layers, functools.partial(self._source_of, image_ref, manifest))
        return await self._resolving.do(digest, fetch)

    async def _source_of(self, image_ref: str, manifest: str, digest: str) -> LayerSource | None:
        """A layer of an image, resolved and mounted (None if it is not served lazily)."""
        try:
            await self._resolving.do(digest, functools.partial(self._resolve, digest, image_ref, manifest))
            await self._builds.wait([digest])
        except PeerpullError:
            return None  # its Prepare falls back (and reports it)
        return self._fs.source(digest)

    async def _resolve(self, digest: str, image_ref: str, manifest_digest: str) -> LayerRecord:
        known = await self._store.run(self._store.layer, digest)
        if known is not None and (self._fs.source(digest) is not None or self._builds.running(digest)):
            return known
        # not mounted: new, or its build failed (its TOC is fetched again)
        self._builds.forget(digest)
        return await self._fetch(digest, image_ref, manifest_digest, known, self._defer_build)

    async def _fetch(self, digest: str, image_ref: str, manifest_digest: str, known: LayerRecord | None,
                     defer: bool) -> LayerRecord:
        """The layer's TOC fetched and kept, its tree built (in the background when `defer` and the
        manifest vouches for the TOC)."""
        image = ImageReference.parse(image_ref)
        self._trust_registry(image.registry)
        times = [time.perf_counter()]
        expected, size = await self._expected_toc(image, digest, manifest_digest)
        times.append(time.perf_counter())
        size, footer, frame = await self._read_toc(image, digest, expected, size)
        times.append(time.perf_counter())
        deferred = defer and expected is not None
        parsing: asyncio.Future[fmt.Toc] | None = None
        if not deferred:
            # the TOC is parsed (CPU) while it is written to disk and the layer gets its slot (I/O):
            # toc_parse_s and store_s below overlap. Deferred, the parse waits for the commit: its
            # thread would hold the GIL against the writes and the event loop the commit waits on
            parsing = asyncio.ensure_future(asyncio.to_thread(layer_build.parse_toc, frame, footer))
        try:
            record = await self._keep(digest, f"{image.registry}/{image.repository}", size, footer, frame)
        except BaseException:
            if parsing is not None:
                await asyncio.gather(parsing, return_exceptions=True)
            raise
        times.append(time.perf_counter())
        facts = {"layer": digest, "image": image_ref, "toc_verified": expected is not None, "toc_bytes": len(frame),
                 "manifest_s": round(times[1] - times[0], 4), "toc_fetch_s": round(times[2] - times[1], 4),
                 "store_s": round(times[3] - times[2], 4)}
        if parsing is None:
            parsing = asyncio.ensure_future(asyncio.to_thread(layer_build.parse_toc, frame, footer))
        build = self._build(record, known, parsing, deferred, times, facts)
        if deferred:
            self._builds.start(digest, build)
            log.info("layer_committed_before_tree", layer=digest, image=image_ref,
                     committed_s=round(times[3] - times[0], 4))
            return record
        await build
        return record

    async def _build(self, record: LayerRecord, known: LayerRecord | None, parsing: asyncio.Future[fmt.Toc],
                     deferred: bool, times: list[float], facts: dict[str, object]) -> None:
        digest = record.digest
        try:
            toc = await parsing
            parsed = time.perf_counter()
            built = await asyncio.to_thread(layer_build.build_layer, digest, record.slot, record.repository, toc)
        except BaseException as exc:
            # not well formed after all: its TOC goes (the next resolve fetches it again); the record stays
            # while a committed snapshot may use it (deferred), else only if it was kept from before
            self._toc_path(digest).unlink(missing_ok=True)
            if known is None and not deferred:
                await self._store.run(self._store.drop_layer, digest)
            if deferred and isinstance(exc, Exception):
                log.error("layer_tree_build_failed", layer=digest, error=str(exc) or type(exc).__name__)
            raise
        self._fs.add_built(built)
        done = time.perf_counter()
        log.info("layer_lazy", files=len(toc.entries), chunks=toc.chunk_count, deferred=deferred, **facts,
                 toc_parse_s=round(parsed - times[2], 4), tree_s=round(done - parsed, 4),
                 total_s=round(done - times[0], 4))

    async def _keep(self, digest: str, repository: str, size: int, footer: fmt.Footer, frame: bytes) -> LayerRecord:
        """The TOC on disk (a restart reads it there) and the layer's record (its slot)."""
        path = self._toc_path(digest)
        tmp = path.with_suffix(".tmp")
        await asyncio.to_thread(tmp.write_bytes, fmt.encode_footer(footer) + frame)
        os.replace(tmp, path)
        return await self._store.run(self._store.add_layer, digest, repository, size)

    async def _read_toc(self, image: ImageReference, digest: str, expected: TocLocation | None,
                        size: int | None) -> tuple[int, fmt.Footer, bytes]:
        """(blob size, footer, TOC frame). The blob's size comes from the manifest when it gives one
        (no HEAD); with the TOC's place announced too, read_toc_frame needs one Range request."""
        if size is None:
            size = await self._client.blob_size(image, digest)
        if size is None:
            raise RegistryNotFoundError(f"layer {digest} is not in {image.registry}/{image.repository}")
        try:
            footer, frame = await read_toc_frame(RegistryBlobReader(self._client, image, digest, size), expected)
        except NoFooterError as exc:
            if expected is None:  # nothing announced a TOC: an ordinary layer
                raise NotSeekableError(str(exc)) from None
            raise
        return size, footer, frame

    async def image_layers(self, image_ref: str, manifest_digest: str) -> list[str] | None:
        """The layer digests the image's manifest lists (fetched by digest once), None if unreadable."""
        try:
            body = await self._manifest(ImageReference.parse(image_ref), manifest_digest)
            layers = json.loads(body).get("layers") or []
            return [d["digest"] for d in layers if isinstance(d, dict) and is_digest(d.get("digest"))]
        except (PeerpullError, ValueError, AttributeError):
            return None

    async def _manifest(self, image: ImageReference, manifest_digest: str) -> bytes:
        """The manifest by digest: from memory, else from disk (a restart keeps it; checked against its
        digest), else fetched once and kept on disk."""
        body = self._manifests.get(manifest_digest)
        if body is None:
            body = await asyncio.to_thread(self._stored_manifest, manifest_digest)
        if body is None:  # the layers of one pull share this fetch
            body = await self._manifest_fetch.do(manifest_digest, functools.partial(self._get_manifest, image, manifest_digest))
        self._manifests[manifest_digest] = body
        self._manifests.move_to_end(manifest_digest)
        while len(self._manifests) > 64:
            self._manifests.popitem(last=False)
        return body

    async def _get_manifest(self, image: ImageReference, manifest_digest: str) -> bytes:
        body = (await self._client.get_manifest(image.with_digest(manifest_digest))).body  # verified by digest
        await asyncio.to_thread(self._keep_manifest, manifest_digest, body)
        return body

    def _manifest_path(self, digest: str) -> Path:
        return self._manifest_dir / (digest.split(":", 1)[1] + ".manifest")

    def _stored_manifest(self, digest: str) -> bytes | None:
        try:
            body = self._manifest_path(digest).read_bytes()
        except OSError:
            return None
        return body if sha256_digest(body) == digest else None

    def _keep_manifest(self, digest: str, body: bytes) -> None:
        path = self._manifest_path(digest)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)
        kept = sorted(self._manifest_dir.glob("*.manifest"), key=lambda p: p.stat().st_mtime)
        for old in kept[:-MANIFESTS_KEPT]:  # small, but not without bound
            old.unlink(missing_ok=True)

    async def _expected_toc(self, image: ImageReference, digest: str,
                            manifest_digest: str) -> tuple[TocLocation | None, int | None]:
        """The TOC location the manifest (fetched by its digest) announces, and the blob size it
        gives; (None, None) without a manifest digest; NotSeekableError if the layer has no TOC."""
        if not manifest_digest:
            return None, None
        body = await self._manifest(image, manifest_digest)
        try:
            layers = json.loads(body).get("layers") or []
        except (ValueError, AttributeError):
            raise FormatError(f"manifest {manifest_digest} is not an image manifest") from None
        desc = next((d for d in layers if isinstance(d, dict) and d.get("digest") == digest), None)
        if desc is None:
            raise FormatError(f"manifest {manifest_digest} does not list layer {digest}")
        location = location_from_annotations(desc.get("annotations"))
        if location is None:
            raise NotSeekableError(f"layer {digest} has no peerpull annotations")
        size = desc.get("size")
        valid = isinstance(size, int) and not isinstance(size, bool) and size > location.offset
        return location, size if valid else None

    async def release(self, digest: str) -> None:
        """Forget a layer no snapshot uses any more."""
        if await self._store.run(self._store.layer_in_use, digest):
            return
        self._builds.forget(digest)
        self._fs.remove_layer(digest)
        if self._image_fetch is not None:
            self._image_fetch.release(digest)
        await self._store.run(self._store.drop_layer, digest)
        self._toc_path(digest).unlink(missing_ok=True)
