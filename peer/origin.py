"""The origin tier: chunk frames read from the layer blob with HTTP Range requests.

Requests that arrive in the same event-loop turn for adjacent frames of one blob are merged into
one Range request (up to `coalesce_max_bytes`); each registry gets at most `origin_max_inflight`
requests at once, so a prefetch cannot flood it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import structlog

from converter.registry.client import RegistryClient
from converter.registry.reference import ImageReference
from peer.chunk import ChunkRef
from peer.config import PeerConfig

log = structlog.get_logger(__name__)


class OriginSource:
    def __init__(self, client: RegistryClient, config: PeerConfig) -> None:
        self._client = client
        self._config = config
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._pending: dict[tuple[str, str], list[tuple[ChunkRef, asyncio.Future[bytes]]]] = defaultdict(list)
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests = 0  # Range requests sent (for tests and metrics)

    async def fetch_frame(self, ref: ChunkRef) -> bytes:
        """The compressed frame of `ref` as the registry stores it (not yet verified)."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[(ref.repository, ref.blob)].append((ref, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, defaultdict(list)
        for (repository, blob), items in pending.items():
            for run in self._runs(sorted(items, key=lambda item: item[0].blob_offset)):
                task = asyncio.ensure_future(self._read_run(repository, blob, run))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _runs(self, items: list[tuple[ChunkRef, asyncio.Future[bytes]]]) -> list[list[tuple[ChunkRef, asyncio.Future[bytes]]]]:
        runs: list[list[tuple[ChunkRef, asyncio.Future[bytes]]]] = []
        for item in items:
            ref = item[0]
            if runs:
                first, last = runs[-1][0][0], runs[-1][-1][0]
                end = last.blob_offset + last.compressed_length
                if ref.blob_offset == last.blob_offset:  # the same frame asked twice
                    runs[-1].append(item)
                    continue
                if ref.blob_offset == end and end + ref.compressed_length - first.blob_offset <= self._config.coalesce_max_bytes:
                    runs[-1].append(item)
                    continue
            runs.append([item])
        return runs

    async def _read_run(self, repository: str, blob: str, run: list[tuple[ChunkRef, asyncio.Future[bytes]]]) -> None:
        start = run[0][0].blob_offset
        end = max(ref.blob_offset + ref.compressed_length for ref, _ in run)
        image = ImageReference.parse(repository)
        limit = self._limits.setdefault(image.registry, asyncio.Semaphore(self._config.origin_max_inflight))
        try:
            async with limit:
                self.requests += 1
                data = await self._client.read_range(image, blob, start, end - start)
        except BaseException as exc:  # every waiter learns of the failure, whatever it was
            for _, future in run:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
            return
        for ref, future in run:
            if not future.done():
                rel = ref.blob_offset - start
                future.set_result(data[rel:rel + ref.compressed_length])

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
