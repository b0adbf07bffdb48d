"""The origin tier: chunk frames read from the layer blob with HTTP Range requests.

Each registry gets at most `origin_max_inflight` requests at once, so a prefetch cannot flood
it; requests that queue meanwhile for nearby frames of one blob (gaps up to MAX_GAP_BYTES) are
served by one Range request of up to `coalesce_max_bytes`. A gap is read across only when nothing
but header frames lies in it (`ChunkRef.next_offset`), so no other node's chunk is fetched twice.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import structlog

from converter.registry.client import RegistryClient
from converter.registry.reference import ImageReference
from peer.chunk import ChunkRef
from peer.config import PeerConfig
from peer.priority import PrioritySlots

log = structlog.get_logger(__name__)
# Reading across a gap of header frames to the next chunk costs less than another request.
MAX_GAP_BYTES = 64 * 1024


def _joinable(first: ChunkRef, second: ChunkRef) -> bool:
    """One Range request may cover both: adjacent, the same frame, or only header frames between."""
    end = first.blob_offset + first.compressed_length
    if second.blob_offset <= end:
        return True
    return second.blob_offset == first.next_offset and second.blob_offset - end <= MAX_GAP_BYTES


class OriginSource:
    def __init__(self, client: RegistryClient, config: PeerConfig) -> None:
        self._client = client
        self._config = config
        self._limits: dict[str, PrioritySlots] = {}
        self._pending: dict[tuple[str, str], list[tuple[ChunkRef, asyncio.Future[bytes]]]] = defaultdict(list)
        self.requests = 0  # Range requests sent

    async def fetch_frame(self, ref: ChunkRef, background: bool = False) -> bytes:
        """The compressed frame of `ref` as the registry stores it (not yet verified).

        The request waits for a slot of its registry; by then other requests for nearby frames of the
        same blob may have queued up, and one Range request serves them all. Background requests
        wait behind on-demand ones and never hold the last two slots.
        """
        key = (ref.repository, ref.blob)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[key].append((ref, future))
        image = ImageReference.parse(ref.repository)
        limit = self._limits.setdefault(image.registry, PrioritySlots(self._config.origin_max_inflight))
        try:
            async with limit.slot(background):
                run = None if future.done() else self._take_run(key, future)
                if run:  # else another request's run already covers this frame
                    await self._read_run(image, ref.blob, run)
        except BaseException:  # cancelled while queued or reading: leave the queue
            self._pending[key] = [item for item in self._pending[key] if item[1] is not future]
            if not future.done():
                future.cancel()
            raise
        return await future

    def _take_run(self, key: tuple[str, str], future: asyncio.Future[bytes]) -> list[tuple[ChunkRef, asyncio.Future[bytes]]]:
        """The queued request of `future` and the queued ones around it that one Range request can cover."""
        items = sorted(self._pending[key], key=lambda item: item[0].blob_offset)
        index = next((i for i, item in enumerate(items) if item[1] is future), None)
        if index is None:
            return []
        ref = items[index][0]
        lo = hi = index
        start, end = ref.blob_offset, ref.blob_offset + ref.compressed_length
        budget = self._config.coalesce_max_bytes
        while True:
            grown = False
            if hi + 1 < len(items) and _joinable(items[hi][0], items[hi + 1][0]):
                new_end = max(end, items[hi + 1][0].blob_offset + items[hi + 1][0].compressed_length)
                if new_end - start <= budget:
                    hi, end, grown = hi + 1, new_end, True
            if lo > 0 and _joinable(items[lo - 1][0], items[lo][0]) and end - items[lo - 1][0].blob_offset <= budget:
                lo, start, grown = lo - 1, min(start, items[lo - 1][0].blob_offset), True
            if not grown:
                break
        run = items[lo:hi + 1]
        taken = {id(item[1]) for item in run}
        self._pending[key] = [item for item in self._pending[key] if id(item[1]) not in taken]
        return run

    async def _read_run(self, image: ImageReference, blob: str, run: list[tuple[ChunkRef, asyncio.Future[bytes]]]) -> None:
        start = min(ref.blob_offset for ref, _ in run)
        end = max(ref.blob_offset + ref.compressed_length for ref, _ in run)
        self.requests += 1
        try:
            data = await self._client.read_range(image, blob, start, end - start)
        except Exception as exc:  # every waiter of the run learns of the failure
            for _, future in run:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved by whoever awaits it, or by nobody if it was cancelled
            return
        for ref, future in run:
            if not future.done():
                rel = ref.blob_offset - start
                future.set_result(data[rel:rel + ref.compressed_length])

    async def close(self) -> None:
        for items in self._pending.values():
            for _, future in items:
                future.cancel()
        self._pending.clear()
