"""A stream: an ordered list of frames brought into the node's cache at the link's full rate.

The frames (across layers and blobs, e.g. a startup profile in first-read order, or a whole
image) are planned into work items in the order they were asked for: for the origin, runs of one
blob that one Range request of at most `coalesce_max_bytes` covers (contiguous frames, or only
header frames between them; never a frame that is cached or already planned, so no byte comes
twice); for frames whose owner is another live peer, groups the peer client batches into its
streamed requests. `stream_parallel` items are in flight at once, across layers, and what they
hold in memory is bounded by `stream_max_bytes_in_flight` for every stream of the node together.

Everything goes through the fetcher with `background=True`: a stream's Range requests take
background slots at the origin (on-demand reads take the next free slot first and background
never holds the last two), verification runs on the fetcher's background pool, and the frames land
in the disk cache where the next read finds them.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import structlog

from peer.budget import ByteBudget
from peer.cache import ChunkCache
from peer.chunk import ChunkRef
from peer.config import PeerConfig
from peer.fetcher import ChunkFetcher
from peer.membership import Membership
from peer.origin import OriginSource, joinable

log = structlog.get_logger(__name__)


@dataclass
class StreamReport:
    frames: int = 0  # distinct frames asked for
    cached: int = 0  # already in the node's cache: nothing fetched
    from_peers: int = 0
    from_origin: int = 0
    requests: int = 0  # Range requests the stream sent to the origin
    bytes: int = 0  # compressed bytes brought into the cache
    failed: int = 0  # frames a later read will fetch (and report) itself

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class _Item:
    first: int  # position of its earliest frame in the stream's order
    refs: tuple[ChunkRef, ...]
    origin: bool  # a Range run (else frames for the owner peers)

    @property
    def size(self) -> int:
        return sum(r.compressed_length for r in self.refs)


def plan(refs: list[ChunkRef], to_peers: set[str], budget: int) -> list[_Item]:
    """Work items in the order of `refs` (distinct digests): origin runs and peer groups, each at
    most `budget` bytes (a single larger frame alone)."""
    position = {r.digest: i for i, r in enumerate(refs)}
    by_blob: dict[tuple[str, str], list[ChunkRef]] = {}
    for ref in refs:
        if ref.digest not in to_peers:
            by_blob.setdefault((ref.repository, ref.blob), []).append(ref)
    for frames in by_blob.values():
        frames.sort(key=lambda r: r.blob_offset)
    planned: set[str] = set()
    items: list[_Item] = []
    group: list[ChunkRef] = []
    for ref in refs:
        if ref.digest in to_peers:
            group.append(ref)
            if sum(r.compressed_length for r in group) >= budget:
                items.append(_Item(position[group[0].digest], tuple(group), False))
                group = []
            continue
        if ref.digest in planned:
            continue
        frames = by_blob[(ref.repository, ref.blob)]
        lo = hi = bisect.bisect_left(frames, ref.blob_offset, key=lambda r: r.blob_offset)
        start, end = ref.blob_offset, ref.blob_offset + ref.compressed_length
        grown = True
        while grown:
            grown = False
            if hi + 1 < len(frames) and frames[hi + 1].digest not in planned and joinable(frames[hi], frames[hi + 1]):
                new_end = max(end, frames[hi + 1].blob_offset + frames[hi + 1].compressed_length)
                if new_end - start <= budget:
                    hi, end, grown = hi + 1, new_end, True
            if lo > 0 and frames[lo - 1].digest not in planned and joinable(frames[lo - 1], frames[lo]) \
                    and end - frames[lo - 1].blob_offset <= budget:
                lo, start, grown = lo - 1, frames[lo - 1].blob_offset, True
        run = tuple(frames[lo:hi + 1])
        planned.update(r.digest for r in run)
        items.append(_Item(position[ref.digest], run, True))
    if group:
        items.append(_Item(position[group[0].digest], tuple(group), False))
    items.sort(key=lambda item: item.first)
    return items


def _split(refs: Sequence[ChunkRef], skip: Callable[[ChunkRef], bool]) -> Iterator[list[ChunkRef]]:
    """The runs of `refs` left when the skipped ones are cut out (never read across a cut)."""
    run: list[ChunkRef] = []
    for ref in refs:
        if skip(ref):
            if run:
                yield run
            run = []
        else:
            run.append(ref)
    if run:
        yield run


class Streamer:
    """One per node: every stream shares its in-flight slots and byte budget."""

    def __init__(self, fetcher: ChunkFetcher, origin: OriginSource, cache: ChunkCache, config: PeerConfig,
                 membership: Membership | None = None) -> None:
        self._fetcher = fetcher
        self._origin = origin
        self._cache = cache
        self._config = config
        self._membership = membership
        self._slots = asyncio.Semaphore(config.stream_parallel)
        self._budget = ByteBudget(config.stream_max_bytes_in_flight)

    @property
    def bytes_in_flight(self) -> int:
        return self._budget.used

    async def _missing(self, refs: list[ChunkRef]) -> list[ChunkRef]:
        """The refs not in the node's cache (a lookup only, nothing decompressed)."""
        maybe = [r for r in refs if self._cache.might_have(r.digest)]
        present: set[str] = set()
        for i in range(0, len(maybe), 256):
            batch = maybe[i:i + 256]
            found = await asyncio.gather(*(self._cached(r) for r in batch))
            present.update(r.digest for r, hit in zip(batch, found) if hit)
        return [r for r in refs if r.digest not in present]

    async def stream(self, refs: Iterable[ChunkRef], what: str, quiet: bool = False) -> StreamReport:
        """Bring every frame of `refs` into the cache, earliest first; cancelling stops it at once.

        `quiet`: log start and end at debug level (a file's fetch-ahead), not info.
        """
        started = time.monotonic()
        emit = log.debug if quiet else log.info
        seen: set[str] = set()
        unique = [r for r in refs if not (r.digest in seen or seen.add(r.digest))]  # type: ignore[func-returns-value]
        report = StreamReport(frames=len(unique))
        todo = await self._missing(unique)
        report.cached = len(unique) - len(todo)
        to_peers = set()
        if self._membership is not None:
            to_peers = {r.digest for r in todo if self._membership.candidates_for(r.digest)}
        items = plan(todo, to_peers, self._config.coalesce_max_bytes)
        emit("stream_started", what=what, frames=len(unique), cached=report.cached, items=len(items),
                 bytes=sum(i.size for i in items))
        work = iter(items)
        async with asyncio.TaskGroup() as group:
            for _ in range(min(self._config.stream_parallel, len(items))):
                group.create_task(self._worker(work, report, what, group))
        emit("stream_done", what=what, seconds=round(time.monotonic() - started, 3), **report.as_dict())
        return report

    async def _worker(self, work: Iterator[_Item], report: StreamReport, what: str,
                      group: asyncio.TaskGroup) -> None:
        for item in work:  # one shared iterator: items start in order
            size = item.size
            await self._budget.acquire(size)  # memory first: verification below still holds it
            handed_on = False
            try:
                async with self._slots:
                    if not item.origin:
                        await self._peers(item, report)
                        continue
                    runs = await self._fetch_runs(item, report)
                # the slot is free for the next run while these frames are verified and cached; the
                # task's completion gives the bytes back, even when it is cancelled before its first step
                # (a coroutine that never started runs no `finally`)
                verify = group.create_task(self._verify(runs, report, what))
                verify.add_done_callback(functools.partial(self._settle, runs, size))
                handed_on = True
            except Exception as exc:
                self._failed(item.refs, exc, report, what)
            finally:
                if not handed_on:
                    self._budget.release(size)

    @staticmethod
    def _failed(refs: Sequence[ChunkRef], exc: Exception, report: StreamReport, what: str) -> None:
        """The frames stay on demand: a read fetches (and reports) them."""
        report.failed += len(refs)
        log.info("stream_item_failed", what=what, blob=refs[0].blob, frames=len(refs), error=str(exc) or type(exc).__name__)

    async def _fetch_runs(self, item: _Item, report: StreamReport) -> list[list[ChunkRef]]:
        """The item's frames still missing, staged at the origin, in as few Range requests as that allows."""
        # a reader may have fetched some frames since the plan: leave those out, and never read
        # across them (their bytes would come twice)
        cached = dict(zip(item.refs, await asyncio.gather(*(self._cached(r) for r in item.refs))))
        fetched: list[list[ChunkRef]] = []
        try:
            for part in _split(item.refs, cached.__getitem__):
                for run in _split(part, self._taken):  # checked again as each run starts
                    fetched.append(run)
                    await self._origin.fetch_run(run, background=True)
                    report.requests += 1
        except BaseException:
            for run in fetched:
                self._origin.unstage(run)
            raise
        report.cached += sum(cached.values())
        return fetched

    def _taken(self, ref: ChunkRef) -> bool:
        """Whether someone else brings the frame in already, or just did: a read's fetch (queued, on
        the wire or being verified: the origin's batches do not show it once sent), a run, or the cache."""
        return self._origin.busy(ref) or self._fetcher.fetching(ref.digest) or self._cache.known(ref.digest)

    async def _verify(self, runs: list[list[ChunkRef]], report: StreamReport, what: str) -> None:
        """Staged frames verified and cached through the fetcher's own path."""
        for run in runs:
            try:
                await asyncio.gather(*(self._fetcher.ensure(r, use_peers=False, background=True) for r in run))
                report.from_origin += len(run)
                report.bytes += sum(r.compressed_length for r in run)
            except Exception as exc:
                self._failed(run, exc, report, what)

    def _settle(self, runs: list[list[ChunkRef]], size: int, _done: asyncio.Task[None]) -> None:
        """A verify task ended (done, failed or cancelled): its staged frames and bytes are free."""
        for run in runs:
            self._origin.unstage(run)
        self._budget.release(size)

    async def _cached(self, ref: ChunkRef) -> bool:
        return await self._cache.contains(ref.digest)  # staged frames count: they are on their way to disk

    async def _peers(self, item: _Item, report: StreamReport) -> None:
        """Frames the owner peers hold (the peer client batches them); a failed peer falls back to the origin."""
        tiers = await asyncio.gather(*(self._fetcher.ensure(r, use_peers=True, background=True)
                                       for r in item.refs))
        for ref, tier in zip(item.refs, tiers):
            if tier == "peer":
                report.from_peers += 1
            else:
                report.from_origin += 1
            report.bytes += ref.compressed_length
