"""Recording startup profiles: the chunks of an image's layers read first after a container starts.

The FileReader calls `observe` for every chunk a read needs (on the event loop, no await): a
dict look-up when nothing records, an append when something does. A recording ends when the image
has been quiet (no new chunk) for `quiet_s`, at `max_s` after its start, at `max_chunks`, or when
the daemon stops (`close` gives the recordings under way up to `flush_s` to be kept: so a short
`peerpull run` on the embedded set-up learns the image's profile too); the finished profile goes
to `on_done`. One recording per image at a time: a second container of an image that is being
recorded adds nothing new.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

import structlog

from converter.format import toc as fmt
from peer.tasks import TaskSet
from snapshotter.service.profiles import StartupProfile

log = structlog.get_logger(__name__)


@dataclass
class Recording:
    image_ref: str
    manifest_digest: str
    layers: frozenset[str]
    started: float
    last: float
    reads: list[tuple[str, int]] = field(default_factory=list)
    seen: set[tuple[str, int]] = field(default_factory=set)
    full: asyncio.Event = field(default_factory=asyncio.Event)  # set at the size cap, or to end it now
    closing: bool = False
    task: asyncio.Task[None] | None = None


class ProfileRecorder:
    def __init__(self, quiet_s: float, max_s: float, max_chunks: int,
                 on_done: Callable[[str, StartupProfile], Awaitable[None]], flush_s: float = 5.0) -> None:
        self._quiet_s = quiet_s
        self._max_s = max_s
        self._max_chunks = max_chunks
        self._on_done = on_done
        self._flush_s = flush_s
        self._by_manifest: dict[str, Recording] = {}
        self._by_blob: dict[str, list[Recording]] = {}
        self._tasks = TaskSet("profile_recorder")

    def observe(self, blob: str, chunk: fmt.Chunk) -> None:
        recordings = self._by_blob.get(blob)
        if not recordings:
            return
        key = (blob, chunk.blob_offset)
        for rec in recordings:
            if key in rec.seen or rec.full.is_set():
                continue
            rec.seen.add(key)
            rec.reads.append(key)
            rec.last = time.monotonic()
            if len(rec.reads) >= self._max_chunks:
                rec.full.set()

    def recording(self, manifest_digest: str) -> bool:
        return manifest_digest in self._by_manifest

    def start(self, image_ref: str, manifest_digest: str, layers: Collection[str]) -> bool:
        """Record the start of a container of this image; False when it is being recorded already."""
        if manifest_digest in self._by_manifest or not layers:
            return False
        now = time.monotonic()
        rec = Recording(image_ref, manifest_digest, frozenset(layers), now, now)
        self._by_manifest[manifest_digest] = rec
        for blob in rec.layers:
            self._by_blob.setdefault(blob, []).append(rec)
        rec.task = self._tasks.spawn(self._watch(rec), f"profile {manifest_digest}")
        log.info("profile_recording_started", image=image_ref, manifest=manifest_digest, layers=len(rec.layers))
        return True

    async def _watch(self, rec: Recording) -> None:
        try:
            while not rec.full.is_set():
                now = time.monotonic()
                until = min(rec.last + self._quiet_s, rec.started + self._max_s)
                if now >= until:
                    break
                try:
                    async with asyncio.timeout(until - now):
                        await rec.full.wait()
                except TimeoutError:
                    pass
        finally:
            self._stop(rec)
        profile = StartupProfile(rec.manifest_digest, tuple(rec.reads))
        now = time.monotonic()
        why = ("shutdown" if rec.closing else "size" if rec.full.is_set() else
               "time" if now >= rec.started + self._max_s else "quiet")
        log.info("profile_recording_ended", image=rec.image_ref, manifest=rec.manifest_digest, chunks=len(rec.reads),
                 seconds=round(now - rec.started, 2), reason=why)
        if profile.reads:
            await self._on_done(rec.image_ref, profile)

    def _stop(self, rec: Recording) -> None:
        self._by_manifest.pop(rec.manifest_digest, None)
        for blob in rec.layers:
            others = [r for r in self._by_blob.get(blob, []) if r is not rec]
            if others:
                self._by_blob[blob] = others
            else:
                self._by_blob.pop(blob, None)

    async def close(self) -> None:
        """End the recordings under way and keep what they have (within `flush_s`), then stop."""
        pending = [rec.task for rec in self._by_manifest.values() if rec.task is not None]
        for rec in list(self._by_manifest.values()):
            rec.closing = True
            rec.full.set()
        if pending:
            await asyncio.wait(pending, timeout=self._flush_s)
        await self._tasks.close()
