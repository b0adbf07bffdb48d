"""`peerpull pull`: make an image runnable by `ctr run --snapshotter peerpull` without
downloading its seekable layers.

Like containerd's own unpacker, with the labels CRI would add: the manifest and config go into
containerd's content store while each layer's snapshot is prepared through containerd (so its
metadata knows it) with the layer digest and image reference labels. The daemon answers
ALREADY_EXISTS for layers it serves lazily; any other layer is downloaded, unpacked by
containerd's applier and committed, exactly as `ctr pull` would. Finally the image record points
at the manifest. Everything is created under a lease and kept afterwards by GC labels.

The report tells the two kinds of full downloads apart: `ordinary` layers carry no peerpull
annotations (never lazy), `fallbacks` are seekable layers the daemon did not serve lazily (it
logs why, and counts it in peerpull_chunk_errors_total{tier="lazy"}).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from converter.format.errors import AlreadyExistsError, DigestMismatchError, FormatError
from converter.format.layer_reader import location_from_annotations
from converter.registry.client import FetchedManifest, RegistryClient
from converter.registry.manifest import parse_manifest
from converter.registry.reference import ImageReference
from snapshotter.containerd.client import ContainerdClient, descriptor
from snapshotter.service.remote import (
    LABEL_IMAGE_LAYERS,
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_TARGET,
)

log = structlog.get_logger(__name__)
_MAX_CONFIG_BYTES = 16 << 20
_MAX_LAYERS_LABEL = 4000  # containerd limits a label to 4096 bytes


@dataclass
class PullReport:
    image: str
    digest: str = ""
    layers: int = 0
    lazy: int = 0
    downloaded: int = 0
    downloaded_bytes: int = 0  # bytes fetched from the registry for full layers (0 for content already present)
    already_present: int = 0
    seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)  # seekable layers downloaded in full
    ordinary: list[str] = field(default_factory=list)  # layers that are not seekable, downloaded in full
    # where the time went (seconds): manifest + config from the registry, content into containerd
    # (overlapping the layers: its own duration), the layers' snapshots (for lazy ones: the daemon's TOC fetch, parse and tree build), the image record
    phases: dict[str, float] = field(default_factory=dict)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain ids: the snapshot names containerd gives the unpacked layers."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def _layers_label(layers: list[dict[str, Any]]) -> str:
    text = ""
    for desc in layers:
        item = ("," if text else "") + desc["digest"]
        if len(text) + len(item) > _MAX_LAYERS_LABEL:
            break
        text += item
    return text


async def resolve_on_node(registry: RegistryClient, ctrd: ContainerdClient,
                          ref: ImageReference) -> tuple[FetchedManifest, FetchedManifest | None]:
    """The image manifest (and its index) of `ref`, from containerd's content store where the node holds
    it (checked by digest): by digest nothing goes to the registry; a tag containerd has an image of
    costs one manifest HEAD (where the tag points now)."""
    head_tag = not ref.digest and await ctrd.image_exists(str(ref))
    return await registry.resolve_image(ref, local=ctrd.read_content, head_tag=head_tag)


async def config_on_node(registry: RegistryClient, ctrd: ContainerdClient, ref: ImageReference, digest: str,
                         max_bytes: int) -> bytes:
    """The image config `digest`: from containerd's content store if there (checked by digest), else the registry."""
    return await ctrd.read_content(digest, max_bytes) or await registry.get_blob_bytes(ref, digest, max_bytes=max_bytes)


async def pull(registry: RegistryClient, ctrd: ContainerdClient, image: str, snapshotter: str,
               progress: Callable[[str], None] | None = None) -> PullReport:
    started = time.monotonic()
    say = progress or (lambda text: None)
    ref = ImageReference.parse(image)
    top, index = await resolve_on_node(registry, ctrd, ref)
    manifest = parse_manifest(top.body, top.media_type, str(ref))
    config_desc = manifest["config"]
    layers: list[dict[str, Any]] = manifest["layers"]
    config_bytes = await config_on_node(registry, ctrd, ref, config_desc["digest"], _MAX_CONFIG_BYTES)
    try:
        diff_ids = list(json.loads(config_bytes)["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"{ref}: image config has no rootfs.diff_ids") from None
    if len(diff_ids) != len(layers):
        raise FormatError(f"{ref}: {len(layers)} layers but {len(diff_ids)} diff_ids")
    chains = chain_ids(diff_ids)
    report = PullReport(str(ref), (index or top).digest, len(layers))
    mark = started

    def phase(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        report.phases[name] = round(now - mark, 4)
        mark = now

    phase("registry_s")
    source_label = {f"containerd.io/distribution.source.{ref.registry}": ref.repository}

    async def put_content() -> None:
        """The config, manifest (and index), with the labels that keep the snapshots and layers alive
        after the lease; written while the layers are prepared (both are under the lease)."""
        began = time.monotonic()
        config_labels = {**source_label}
        if chains:
            config_labels[f"containerd.io/gc.ref.snapshot.{snapshotter}"] = chains[-1]
        await _put_blob(ctrd, config_desc["digest"], config_bytes, config_labels)
        manifest_labels = {"containerd.io/gc.ref.content.config": config_desc["digest"], **source_label,
                           **{f"containerd.io/gc.ref.content.l.{i}": d["digest"] for i, d in enumerate(layers)}}
        await _put_blob(ctrd, top.digest, top.body, manifest_labels)
        if index is not None:
            await _put_blob(ctrd, index.digest, index.body, {"containerd.io/gc.ref.content.m.0": top.digest, **source_label})
        report.phases["content_s"] = round(time.monotonic() - began, 4)

    await ctrd.create_lease()
    content: asyncio.Future[None] | None = None
    try:
        content = asyncio.ensure_future(put_content())
        parent = ""
        for i, desc in enumerate(layers):
            chain = chains[i]
            if await ctrd.snapshot_exists(snapshotter, chain):
                report.already_present += 1
                parent = chain
                continue
            labels = {LABEL_TARGET: chain, LABEL_LAYER_DIGEST: desc["digest"], LABEL_IMAGE_REF: str(ref),
                      LABEL_MANIFEST_DIGEST: top.digest, LABEL_IMAGE_LAYERS: _layers_label(layers[i:])}
            key = f"extract-{uuid.uuid4().hex[:12]} {chain}"
            try:
                mounts = await ctrd.prepare(snapshotter, key, parent, labels)
            except AlreadyExistsError:
                report.lazy += 1
                say(f"layer {i + 1}/{len(layers)} {desc['digest'][:19]}: lazy")
                parent = chain
                continue
            seekable = location_from_annotations(desc.get("annotations")) is not None
            why = "not served lazily" if seekable else "not seekable"
            say(f"layer {i + 1}/{len(layers)} {desc['digest'][:19]}: {why}, downloading {desc['size']} bytes")
            try:
                fetched = await _download_layer(registry, ctrd, ref, desc, source_label)
                applied = await ctrd.apply(descriptor(desc["mediaType"], desc["digest"], desc["size"]), mounts)
                if applied != diff_ids[i]:
                    raise DigestMismatchError(f"layer {desc['digest']} unpacked to {applied}, config says {diff_ids[i]}")
                await ctrd.commit(snapshotter, chain, key)
            except BaseException:
                try:
                    await ctrd.remove(snapshotter, key)
                except Exception:
                    pass
                raise
            report.downloaded += 1
            report.downloaded_bytes += fetched
            (report.fallbacks if seekable else report.ordinary).append(desc["digest"])
            parent = chain

        await content
        phase("layers_s")
        target = index or top
        await ctrd.put_image(str(ref), descriptor(target.media_type, target.digest, len(target.body)), {})
    finally:
        if content is not None and not content.done():
            content.cancel()
            await asyncio.gather(content, return_exceptions=True)
        await ctrd.delete_lease()
    phase("image_s")
    report.seconds = round(time.monotonic() - started, 3)
    log.info("image_pulled", image=str(ref), layers=report.layers, lazy=report.lazy, downloaded=report.downloaded,
             downloaded_bytes=report.downloaded_bytes, present=report.already_present, fallbacks=len(report.fallbacks),
             seconds=report.seconds, **report.phases)
    if report.fallbacks:
        log.warning("lazy_pull_fell_back", image=str(ref), layers=len(report.fallbacks), of=report.layers,
                    hint="the daemon could not serve these seekable layers lazily; its log says why")
    return report


async def _put_blob(ctrd: ContainerdClient, digest: str, data: bytes, labels: dict[str, str]) -> None:
    if await ctrd.content_exists(digest):
        await ctrd.set_content_labels(digest, labels)
    else:
        await ctrd.write_bytes(digest, data, labels)


async def _download_layer(registry: RegistryClient, ctrd: ContainerdClient, ref: ImageReference, desc: dict[str, Any],
                          labels: dict[str, str]) -> int:
    """Bytes fetched from the registry: the layer's size, or 0 when containerd already had it."""
    if await ctrd.content_exists(desc["digest"]):
        return 0
    await ctrd.write_content(desc["digest"], int(desc["size"]), registry.stream_blob(ref, desc["digest"], size=int(desc["size"])), labels)
    return int(desc["size"])
