"""The origin tier: chunk frames read from the layer blob with HTTP Range requests.

Each registry gets at most `origin_max_inflight` requests at once, so a prefetch cannot flood
it; requests that queue meanwhile for nearby frames of one blob (gaps up to MAX_GAP_BYTES) are
served by one Range request of up to `coalesce_max_bytes`. A gap is read across only when nothing
but header frames lies in it (`ChunkRef.next_offset`, `joinable`), so no other node's chunk is fetched twice.

A stream (peer/stream.py) sends its own runs (`fetch_run`): while a run is on the wire, a request
for one of its frames waits for that answer instead of asking again, and a frame that arrived
stays staged (`staged`) until the fetcher has verified and cached it. The queue's own Range
requests count as on the wire too, once sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

import structlog

from converter.registry.client import RegistryClient
from converter.registry.reference import ImageReference
from peer.batching import Batch, BatchQueue
from peer.chunk import ChunkRef
from peer.config import PeerConfig
from peer.priority import PrioritySlots

log = structlog.get_logger(__name__)
# Reading across a gap of header frames to the next chunk costs less than another request.
MAX_GAP_BYTES = 64 * 1024


class Abandoned(Exception):
    """The request a waiter relied on was cancelled (its stream stopped, its reader went away):
    the waiter asks on its own, it is not cancelled itself."""


def joinable(first: ChunkRef, second: ChunkRef) -> bool:
    """One Range request may cover both: adjacent, the same frame, or only header frames between."""
    end = first.blob_offset + first.compressed_length
    if second.blob_offset <= end:
        return True
    return second.blob_offset == first.next_offset and second.blob_offset - end <= MAX_GAP_BYTES


def coalescing(budget: int) -> Callable[[list[ChunkRef], int], list[int]]:
    """The selection of the origin's batches: the queued request at `own` and the queued ones
    around it (by blob offset) that one Range request of at most `budget` bytes can cover."""

    def select(queued: list[ChunkRef], own: int) -> list[int]:
        order = sorted(range(len(queued)), key=lambda i: queued[i].blob_offset)
        items = [queued[i] for i in order]
        index = order.index(own)
        ref = items[index]
        lo = hi = index
        start, end = ref.blob_offset, ref.blob_offset + ref.compressed_length
        while True:
            grown = False
            if hi + 1 < len(items) and joinable(items[hi], items[hi + 1]):
                new_end = max(end, items[hi + 1].blob_offset + items[hi + 1].compressed_length)
                if new_end - start <= budget:
                    hi, end, grown = hi + 1, new_end, True
            if lo > 0 and joinable(items[lo - 1], items[lo]) and end - items[lo - 1].blob_offset <= budget:
                lo, start, grown = lo - 1, min(start, items[lo - 1].blob_offset), True
            if not grown:
                break
        return order[lo:hi + 1]

    return select


class OriginSource:
    def __init__(self, client: RegistryClient, config: PeerConfig) -> None:
        self._client = client
        self._config = config
        self._limits: dict[str, PrioritySlots] = {}
        self._queue: BatchQueue[tuple[str, str], ChunkRef, bytes] = BatchQueue(
            self._read_run, coalescing(config.coalesce_max_bytes))
        self.requests = 0  # Range requests sent
        self.bytes = 0  # bytes those requests asked for
        # frames of stream runs: on the wire (a future) or arrived and not yet cached (bytes)
        self._on_wire: dict[str, asyncio.Future[bytes]] = {}
        self._staged: dict[str, bytes] = {}

    def _slots(self, ref: ChunkRef) -> PrioritySlots:
        image = ImageReference.parse(ref.repository)
        return self._limits.setdefault(image.registry, PrioritySlots(self._config.origin_max_inflight))

    async def fetch_frame(self, ref: ChunkRef, background: bool = False) -> bytes:
        """The compressed frame of `ref` as the registry stores it (not yet verified).

        The request waits for a slot of its registry; by then other requests for nearby frames of the
        same blob may have queued up, and one Range request serves them all. Background requests
        wait behind on-demand ones and never hold the last two slots.
        """
        staged = self._staged.get(ref.digest)
        if staged is not None:
            return staged
        wire = self._on_wire.get(ref.digest)
        if wire is not None:
            try:
                return await asyncio.shield(wire)  # already on its way: asking again doubles the bytes
            except Exception:  # noqa: BLE001 — the run failed: this request asks on its own
                pass
        limit = self._slots(ref)
        return await self._queue.submit((ref.repository, ref.blob), ref, lambda: limit.slot(background))

    async def fetch_run(self, refs: Sequence[ChunkRef], background: bool = True) -> list[bytes]:
        """The frames of `refs` (one blob, in blob order, joinable) in one Range
        request under a slot of their registry; each stays staged until `unstage`."""
        futures = self._claim_wire(ref for ref in refs if ref.digest not in self._staged)
        try:
            async with self._slots(refs[0]).slot(background):
                start = refs[0].blob_offset
                end = max(r.blob_offset + r.compressed_length for r in refs)
                self.requests += 1
                self.bytes += end - start
                frames = await self._read_frames(refs[0].repository, refs[0].blob, start, end, refs)
            for ref, frame in zip(refs, frames):
                if ref.digest in futures:
                    self._staged[ref.digest] = frame
                    futures[ref.digest].set_result(frame)
            return frames
        except BaseException as exc:
            _fail_wire(futures, exc)
            raise
        finally:
            self._release_wire(futures)

    @property
    def staged_bytes(self) -> int:
        """Frames of stream runs that arrived and wait for the fetcher (within the streams' budget)."""
        return sum(len(frame) for frame in self._staged.values())

    def busy(self, ref: ChunkRef) -> bool:
        """Whether `ref`'s frame is being fetched already: queued, on the wire, or arrived."""
        if ref.digest in self._on_wire or ref.digest in self._staged:
            return True
        return any(q.digest == ref.digest for q in self._queue.waiting((ref.repository, ref.blob)))

    def unstage(self, refs: Sequence[ChunkRef]) -> None:
        """Forget the staged frames of a run once the fetcher has them (verified and cached, or failed)."""
        for ref in refs:
            self._staged.pop(ref.digest, None)

    async def _read_run(self, key: tuple[str, str], run: Batch[ChunkRef, bytes]) -> None:
        repository, blob = key
        start = min(ref.blob_offset for ref, _ in run)
        end = max(ref.blob_offset + ref.compressed_length for ref, _ in run)
        # on the wire like a stream's run: a request for one of these frames (a read, while a
        # background fetch of the frame is out) waits for this answer instead of asking again
        wires = self._claim_wire(ref for ref, _ in run)
        try:
            self.requests += 1
            self.bytes += end - start
            frames = await self._read_frames(repository, blob, start, end, [ref for ref, _ in run])
            for (ref, future), frame in zip(run, frames):
                if not future.done():
                    future.set_result(frame)
                wire = wires.get(ref.digest)
                if wire is not None and not wire.done():
                    wire.set_result(frame)
        except BaseException as exc:
            _fail_wire(wires, exc)
            raise
        finally:
            self._release_wire(wires)

    async def _read_frames(self, repository: str, blob: str, start: int, end: int,
                           refs: Sequence[ChunkRef]) -> list[bytes]:
        """The frames of `refs` from one Range request of [start, end), each cut out as the answer
        arrives (the range is never held whole beside its frames)."""
        image = ImageReference.parse(repository)
        spans = sorted({(r.blob_offset - start, r.compressed_length) for r in refs})
        if any(b < a + n for (a, n), (b, _) in zip(spans, spans[1:])):  # frames that overlap (a hostile TOC)
            data = await self._client.read_range(image, blob, start, end - start)
            return [data[r.blob_offset - start:r.blob_offset - start + r.compressed_length] for r in refs]
        pieces = dict(zip(spans, await self._client.read_range_pieces(image, blob, start, end - start, spans)))
        return [pieces[(r.blob_offset - start, r.compressed_length)] for r in refs]

    def _claim_wire(self, refs: Iterable[ChunkRef]) -> dict[str, asyncio.Future[bytes]]:
        """Mark the frames of a request about to be sent as on the wire (those not already): a later
        request for one of them waits for this answer instead of asking again."""
        loop = asyncio.get_running_loop()
        claimed: dict[str, asyncio.Future[bytes]] = {}
        for ref in refs:
            if ref.digest not in self._on_wire:
                claimed[ref.digest] = self._on_wire[ref.digest] = loop.create_future()
        return claimed

    def _release_wire(self, claimed: dict[str, asyncio.Future[bytes]]) -> None:
        for digest, wire in claimed.items():
            if self._on_wire.get(digest) is wire:
                del self._on_wire[digest]

    async def close(self) -> None:
        self._queue.cancel_all()
        self._staged.clear()


def _fail_wire(claimed: dict[str, asyncio.Future[bytes]], exc: BaseException) -> None:
    """The request failed: its waiters see the error (or Abandoned when it was cancelled) and ask on their own."""
    for wire in claimed.values():
        if not wire.done():
            wire.set_exception(exc if isinstance(exc, Exception) else Abandoned())
            wire.exception()  # retrieved: a waiter may be gone
