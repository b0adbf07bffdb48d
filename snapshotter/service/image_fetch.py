"""What an image brings in at pull time and after: its startup profile first, then (by rule) the rest.

At the first Prepare of an image (`pulled`), once its layers are resolved:
1. the startup profile, if a ProfileSource has one for the manifest, is streamed in profile order
   (first-read order, across layers) while the container starts; a profile naming frames the
   layers do not have is stale: those entries are skipped (a hint costs bandwidth, never
   correctness);
2. the rest of the image streams in the background (`snapshotter.stream`): `always` right after
   the profile; `auto` (default) once containers have read more than `stream_after_bytes` of the
   image outside its profile (distinct frames, counted from the reader's observer), i.e. a
   workload that reads much of the image gets it at the link's rate instead of chunk by chunk;
   `never` leaves everything else on demand.
Streams run behind on-demand reads (peer/stream.py). Every image's fetch is cancelled when one of
its layers is released and at daemon shutdown.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from converter.format import toc as fmt
from peer.stream import Streamer
from peer.tasks import TaskSet
from snapshotter.config import SnapshotterConfig
from snapshotter.fs.file_reader import LayerSource
from snapshotter.service.profiles import ProfileSource, StartupProfile

log = structlog.get_logger(__name__)


SourceOf = Callable[[str], Awaitable[LayerSource | None]]


@dataclass
class _Image:
    image_ref: str
    manifest: str
    layers: list[str]
    profiled: set[tuple[str, int]] = field(default_factory=set)  # (blob, offset) of the profile's frames
    read: set[tuple[str, int]] = field(default_factory=set)  # frames read outside the profile
    read_bytes: int = 0
    beyond: asyncio.Event = field(default_factory=asyncio.Event)  # read past the threshold
    task: asyncio.Task[None] | None = None


def frame_at(source: LayerSource, offset: int) -> fmt.Chunk | None:
    i = bisect.bisect_left(source.chunks, offset, key=lambda c: c.blob_offset)
    return source.chunks[i] if i < len(source.chunks) and source.chunks[i].blob_offset == offset else None


class ImageFetch:
    def __init__(self, streamer: Streamer, config: SnapshotterConfig, profiles: ProfileSource | None = None) -> None:
        self._streamer = streamer
        self._config = config
        self._profiles = profiles
        self._images: dict[str, _Image] = {}  # by manifest digest
        self._by_blob: dict[str, list[_Image]] = {}
        self._tasks = TaskSet("image_fetch")

    def use_profiles(self, profiles: ProfileSource) -> None:
        """Where startup profiles come from (set once the daemon has built its profile finder)."""
        self._profiles = profiles

    def pulled(self, image_ref: str, manifest: str, layers: list[str], source_of: SourceOf) -> None:
        """The first Prepare of an image: start its fetch (once per manifest)."""
        if manifest in self._images or not layers:
            return
        image = _Image(image_ref, manifest, list(layers))
        self._images[manifest] = image
        for blob in layers:
            self._by_blob.setdefault(blob, []).append(image)
        image.task = self._tasks.spawn(self._run(image, source_of), f"image-fetch {manifest}")

    def observe(self, blob: str, chunk: fmt.Chunk) -> None:
        """A read needs `chunk` of layer `blob` (FileReader observer: cheap, no await)."""
        for image in self._by_blob.get(blob, ()):
            key = (blob, chunk.blob_offset)
            if image.beyond.is_set() or key in image.profiled or key in image.read:
                continue
            image.read.add(key)
            image.read_bytes += chunk.frame_length  # whole frames come over the wire
            if image.read_bytes > self._config.stream_after_bytes:
                image.read.clear()
                image.beyond.set()

    def release(self, layer: str) -> None:
        """A layer is gone: stop the fetch of every image that has it."""
        for image in self._by_blob.pop(layer, []):
            self._forget(image)
            if image.task is not None:
                image.task.cancel()

    def _forget(self, image: _Image) -> None:
        self._images.pop(image.manifest, None)
        for blob in image.layers:
            users = self._by_blob.get(blob)
            if users is not None and image in users:
                users.remove(image)
                if not users:
                    del self._by_blob[blob]

    async def close(self) -> None:
        await self._tasks.close()

    async def _run(self, image: _Image, source_of: SourceOf) -> None:
        resolved = await asyncio.gather(*(source_of(blob) for blob in image.layers), return_exceptions=True)
        sources = {blob: s for blob, s in zip(image.layers, resolved) if isinstance(s, LayerSource)}
        if not sources:
            return
        profile = await self._profile(image)
        if profile is not None:
            refs = []
            for blob, offset in profile.reads:
                source = sources.get(blob)
                chunk = frame_at(source, offset) if source is not None else None
                if chunk is not None and source is not None:
                    refs.append(source.ref(chunk))
                    image.profiled.add((blob, offset))
            skipped = len(profile.reads) - len(refs)
            if skipped:
                log.info("profile_stale_entries", image=image.image_ref, manifest=image.manifest, skipped=skipped)
            await self._streamer.stream(refs, f"profile {image.image_ref}")
        mode = self._config.stream
        if mode == "never":
            return
        if mode == "auto":
            await image.beyond.wait()
        rest = [s.ref(c) for blob in image.layers if (s := sources.get(blob)) is not None for c in s.chunks]
        await self._streamer.stream(rest, f"image {image.image_ref}")

    async def _profile(self, image: _Image) -> StartupProfile | None:
        if self._profiles is None or not self._config.profile_fetch:
            return None
        try:
            profile = await self._profiles.find(image.image_ref, image.manifest)
        except Exception as exc:  # a hint: without it the image reads on demand
            log.warning("profile_lookup_failed", image=image.image_ref, error=str(exc) or type(exc).__name__)
            return None
        if profile is not None and profile.manifest_digest != image.manifest:
            log.info("profile_ignored", image=image.image_ref, reason="another manifest")
            return None
        return profile
