"""Convert an image into a seekable image and push it: manifest and config rewrite, layers in parallel.

Each layer streams from the source, is decompressed and re-framed on a worker thread (never on the
event loop), lands in a temporary file, and is pushed once its digest is known. Layers that are
already seekable pass through untouched, so converting a converted image is a no-op (unless a
startup-first layout, converter/conversion/layout.py, names files of them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import structlog

from converter.conversion.config import ConvertConfig
from converter.conversion.image_source import ImageSource, ResolvedImage
from converter.conversion.layer_writer import LayerResult, write_seekable_layer
from converter.conversion.layout import LayoutPlan, SegmentReader, plan_layout
from converter.conversion.streams import AsyncIterReader, open_decompressed
from converter.format import toc as fmt
from converter.format import untrusted
from converter.format.annotations import is_seekable_descriptor
from converter.format.errors import FormatError
from converter.registry import media_types as mt
from converter.registry.client import RegistryClient
from converter.registry.reference import ImageReference

log = structlog.get_logger(__name__)


class ConvertProgress(Protocol):
    """Receives progress of each layer in source (compressed) bytes; called from worker threads."""

    def layer_started(self, digest: str, total_bytes: int) -> None: ...

    def layer_advanced(self, digest: str, nbytes: int) -> None: ...

    def layer_finished(self, digest: str) -> None: ...


class _NoProgress:
    def layer_started(self, digest: str, total_bytes: int) -> None:
        pass

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        pass

    def layer_finished(self, digest: str) -> None:
        pass


@dataclass(frozen=True)
class LayerReport:
    source_digest: str
    source_size: int
    digest: str
    size: int
    converted: bool  # False: it was seekable already and passed through
    uncompressed_size: int | None = None
    entries: int | None = None
    chunks: int | None = None
    toc_bytes: int | None = None
    seconds: float = 0.0
    frames: int | None = None  # distinct content frames (format v2 packs small files: fewer than chunks)
    format_version: int | None = None
    # startup-first layout (None: the layer had no startup files): files moved to the front, their
    # content bytes, and startup files left in place (moving them could change what unpacks)
    startup_moved: int | None = None
    startup_moved_bytes: int | None = None
    startup_refused: int | None = None


@dataclass
class ConvertReport:
    source: str
    destination: str
    manifest_digest: str = ""
    already_seekable: bool = False
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    # startup-first layout: the new TOC of each layer named in `startup` (source layer digest →
    # TOC), from which the new image's profile is made
    new_tocs: dict[str, fmt.Toc] = field(default_factory=dict, repr=False)
    layout: dict[str, Any] | None = None  # the startup-first layout's summary (peerpull convert --profile)

    @property
    def uncompressed_bytes(self) -> int:
        return sum(layer.uncompressed_size or 0 for layer in self.layers if layer.converted)


@dataclass(frozen=True)
class _LayerOutcome:
    report: LayerReport
    descriptor: dict[str, Any]  # the layer's descriptor in the new manifest
    diff_id: str | None  # None: passed through, the source config's diff_id stands
    toc: fmt.Toc | None = None  # kept for a layer named in `startup`


def layer_descriptor(result: LayerResult, chunk_size: int, source: dict[str, Any]) -> dict[str, Any]:
    annotations = dict(source.get("annotations") or {})
    annotations.update({
        fmt.ANNOTATION_VERSION: str(result.format_version),
        fmt.ANNOTATION_TOC_DIGEST: result.toc_digest,
        fmt.ANNOTATION_TOC_OFFSET: str(result.toc_offset),
        fmt.ANNOTATION_TOC_LENGTH: str(result.toc_length),
        fmt.ANNOTATION_CHUNK_SIZE: str(chunk_size),
        fmt.ANNOTATION_SOURCE_DIGEST: source["digest"],
    })
    return {"mediaType": mt.OCI_LAYER_ZSTD, "digest": result.digest, "size": result.size, "annotations": annotations}


def config_diff_ids(config_body: bytes, what: str) -> list[str]:
    try:
        diff_ids = untrusted.loads(config_body)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"{what}: image config has no rootfs.diff_ids") from None
    if not isinstance(diff_ids, list):
        raise FormatError(f"{what}: image config's rootfs.diff_ids is not a list")
    return diff_ids


def rewrite_config(config_body: bytes, diff_ids: list[str]) -> bytes:
    """The config with `rootfs.diff_ids` set to `diff_ids`; the same bytes when they already match."""
    config = untrusted.loads(config_body)
    if config["rootfs"]["diff_ids"] == diff_ids:
        return config_body
    config["rootfs"]["diff_ids"] = diff_ids
    return json.dumps(config, separators=(",", ":")).encode()


class Converter:
    def __init__(self, client: RegistryClient, config: ConvertConfig, progress: ConvertProgress | None = None) -> None:
        self._client = client
        self._config = config
        self._progress = progress or _NoProgress()
        self._slots = asyncio.Semaphore(config.jobs)
        self._workers = max(1, os.cpu_count() or 1)

    async def convert(self, source: ImageSource, dest: ImageReference,
                      startup: Mapping[str, Sequence[str]] | None = None) -> ConvertReport:
        """Convert and push; `startup` (source layer digest → TOC paths in first-read order) lays
        those files out first in their layers, re-framing them even when already seekable; the new
        TOC of every layer it names (an empty list: no layout, only the TOC) is in the report."""
        started = time.monotonic()
        startup = dict(startup or {})
        image = await source.resolve()
        report = ConvertReport(source=source.description, destination=str(dest))
        layers = image.manifest["layers"]
        for desc in layers:
            mt.layer_compression(desc.get("mediaType", ""))  # refuse foreign/unknown layers before any work
        # the config first: a bad one fails the conversion before any layer work
        config_body = await source.read_blob(image.manifest["config"]["digest"])
        report.already_seekable = all(is_seekable_descriptor(d) and not startup.get(d["digest"]) for d in layers)
        if not report.already_seekable and len(config_diff_ids(config_body, f"image {image.digest}")) != len(layers):
            raise FormatError(f"image {image.digest}: its config lists a different number of diff_ids than "
                              f"its {len(layers)} layers")
        log.debug("convert_started", source=source.description, destination=str(dest), layers=len(layers),
                 already_seekable=report.already_seekable)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._layer(source, dest, d, startup.get(d["digest"]))) for d in layers]
        outcomes = [t.result() for t in tasks]
        report.layers = [o.report for o in outcomes]
        report.new_tocs = {o.report.source_digest: o.toc for o in outcomes if o.toc is not None}
        if report.already_seekable:
            body, media_type = image.body, image.media_type
            await self._client.push_blob_bytes(dest, config_body)
        else:
            body, media_type = await self._new_manifest(image, dest, config_body, outcomes)
        report.manifest_digest = await self._client.push_manifest(dest, body, media_type)
        report.seconds = time.monotonic() - started
        log.debug("convert_finished", destination=str(dest), manifest=report.manifest_digest,
                 seconds=round(report.seconds, 2))
        return report

    async def _new_manifest(
        self, image: ResolvedImage, dest: ImageReference, config_body: bytes, outcomes: list[_LayerOutcome]
    ) -> tuple[bytes, str]:
        what = f"image {image.digest}"
        known = config_diff_ids(config_body, what)
        if len(known) != len(outcomes):
            raise FormatError(f"{what}: config has {len(known)} diff_ids for {len(outcomes)} layers")
        ids = [o.diff_id if o.diff_id is not None else known[i] for i, o in enumerate(outcomes)]
        new_config = rewrite_config(config_body, ids)
        config_digest = await self._client.push_blob_bytes(dest, new_config)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest, "size": len(new_config)},
            "layers": [o.descriptor for o in outcomes],
        }
        annotations = dict(image.manifest.get("annotations") or {})
        annotations[fmt.ANNOTATION_IMAGE_SOURCE] = image.digest
        manifest["annotations"] = annotations
        return json.dumps(manifest, separators=(",", ":")).encode(), mt.OCI_MANIFEST

    async def _layer(self, source: ImageSource, dest: ImageReference, desc: dict[str, Any],
                     startup: Sequence[str] | None) -> _LayerOutcome:
        async with self._slots:
            if is_seekable_descriptor(desc) and not startup:
                await self._copy_blob(source, dest, desc)
                report = LayerReport(desc["digest"], desc["size"], desc["digest"], desc["size"], converted=False)
                return _LayerOutcome(report, desc, None)
            return await self._convert_layer(source, dest, desc, startup)

    async def _copy_blob(self, source: ImageSource, dest: ImageReference, desc: dict[str, Any]) -> None:
        digest = desc["digest"]
        if await self._client.blob_size(dest, digest) is not None:
            return
        with self._temp_file() as path:
            with open(path, "wb") as f:
                async for block in source.stream_blob(digest, desc["size"]):
                    await asyncio.to_thread(f.write, block)
            await self._client.push_blob_file(dest, digest, path, desc["size"], mount_from=source.registry_ref)

    def _temp_file(self) -> _TempPath:
        return _TempPath(self._config.work_dir)

    async def _convert_layer(
        self, source: ImageSource, dest: ImageReference, desc: dict[str, Any], startup: Sequence[str] | None
    ) -> _LayerOutcome:
        digest, started = desc["digest"], time.monotonic()
        compression = mt.layer_compression(desc["mediaType"])
        what = f"layer {digest}"
        loop = asyncio.get_running_loop()
        stream = source.stream_blob(digest, desc["size"])
        self._progress.layer_started(digest, desc["size"])
        reader = AsyncIterReader(stream, loop, on_bytes=lambda n: self._progress.layer_advanced(digest, n))

        plan: LayoutPlan | None = None
        cfg = self._config

        def write(tar: Any, out: Any) -> LayerResult:
            return write_seekable_layer(tar, out, chunk_size=cfg.chunk_size, level=cfg.compression_level,
                                        workers=self._workers, format_version=cfg.format_version)

        def work(path: Path) -> LayerResult:
            nonlocal plan
            with open(path, "wb") as out:
                tar = open_decompressed(reader, compression, what)  # type: ignore[arg-type]
                if not startup:
                    result = write(tar, out)
                    reader.drain()  # the source stream checks the blob digest at its end
                    return result
                # the startup files may sit anywhere in the stream: spool the tar, then write it reordered
                with tempfile.TemporaryFile(prefix="peerpull-spool-", dir=cfg.work_dir) as spool:
                    shutil.copyfileobj(tar, spool, 1 << 20)
                    reader.drain()
                    spool.seek(0)
                    small = fmt.pack_threshold(cfg.chunk_size) if cfg.format_version >= 2 else 0
                    plan = plan_layout(spool, startup, small)
                    return write(SegmentReader(spool, plan.segments), out)

        with self._temp_file() as path:
            try:
                result = await asyncio.to_thread(work, path)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            await self._client.push_blob_file(dest, result.digest, path, result.size)
        self._progress.layer_finished(digest)
        seconds = time.monotonic() - started
        log.debug("layer_converted", source_digest=digest, digest=result.digest, uncompressed=result.uncompressed_size,
                 chunks=result.chunks, frames=result.frames, format_version=result.format_version,
                 entries=result.entries, seconds=round(seconds, 2))
        report = LayerReport(
            source_digest=digest, source_size=desc["size"], digest=result.digest, size=result.size, converted=True,
            uncompressed_size=result.uncompressed_size, entries=result.entries, chunks=result.chunks,
            toc_bytes=result.toc_length, seconds=seconds, frames=result.frames, format_version=result.format_version,
        )
        if plan is not None:
            report = dataclasses.replace(report, startup_moved=len(plan.moved), startup_moved_bytes=plan.moved_bytes,
                                         startup_refused=len(plan.refused))
            log.debug("layer_laid_out", source_digest=digest, moved=len(plan.moved), moved_bytes=plan.moved_bytes,
                      refused=len(plan.refused))
        return _LayerOutcome(report, layer_descriptor(result, self._config.chunk_size, desc), result.diff_id,
                             result.toc if startup is not None else None)


class FrameSpread(NamedTuple):
    """Where a set of frames lies in a layer: how many of its frames it names, how many lie from
    the first of them to the last (equal when contiguous), and how many runs of consecutive frames
    it forms (the Range requests that fetch exactly those frames)."""

    frames: int
    span: int
    runs: int


def frame_spread(toc: fmt.Toc, offsets: Sequence[int]) -> FrameSpread:
    """The spread, in `toc`'s frames in blob order, of the frames at blob `offsets`."""
    order = {o: i for i, o in enumerate(sorted({c.blob_offset for e in toc.entries for c in e.chunks}))}
    index = sorted({order[o] for o in offsets if o in order})
    runs = sum(1 for i, x in enumerate(index) if i == 0 or x != index[i - 1] + 1)
    return FrameSpread(len(index), index[-1] - index[0] + 1 if index else 0, runs)


class _TempPath:
    """A temporary file path removed on exit, whatever happened."""

    def __init__(self, work_dir: str | None) -> None:
        fd, name = tempfile.mkstemp(prefix="peerpull-layer-", dir=work_dir)
        os.close(fd)
        self.path = Path(name)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)
