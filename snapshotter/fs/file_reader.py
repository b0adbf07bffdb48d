"""Byte ranges of lazily served files, assembled from verified chunks.

Reads fetch every chunk they cover at once through the node's chunk fetcher (cache → peers →
origin). Recently used chunks stay decompressed in a bounded memory cache, because the kernel
asks for a 1 MiB chunk in several pieces. With sequential prefetch (the default), a file read
sequentially past a threshold has the rest of it scheduled in the background, in parallel; with
file prefetch, on its first read; with layer prefetch, the first read from a layer schedules every
large chunk of the layer. Background fetches queue behind on-demand reads at the origin and never
hold its last slots, so they use the spare bandwidth without delaying a reader. Observers
(`add_observer`) learn of every chunk a read needs (the image fetch counts what an image reads).
"""

from __future__ import annotations

import asyncio
import bisect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from converter.format import toc as fmt
from peer.chunk import ChunkRef
from peer.fetcher import ChunkFetcher
from peer.stream import Streamer
from peer.tasks import TaskSet

log = structlog.get_logger(__name__)
LAYER_PREFETCH_MIN_CHUNK = 256 << 10  # layer prefetch takes chunks of files at least this large
SEQUENTIAL_SLACK = 2 << 20
READ_AHEAD_CHUNKS = 4  # decoded ahead of a sequential reader: verifying and decompressing overlap the copy
# A small file read from the network brings its neighbours in the blob along: tar order groups a
# directory's files, and programs (Python imports, shared libraries) read siblings one after another.
NEIGHBOURS_MAX = 32
NEIGHBOURS_BYTES = 1 << 20


@dataclass
class LayerSource:
    """Where a layer's chunks come from, and the blob offset of the frame after each chunk's frame.

    `chunks` holds one chunk per distinct frame (format v2 frames hold several files' pieces; they
    share the blob offset), in blob order."""

    repository: str
    blob: str
    next_offset: dict[int, int] = field(default_factory=dict)
    chunks: list[fmt.Chunk] = field(default_factory=list)  # one per distinct frame, in blob order

    @classmethod
    def from_toc(cls, repository: str, blob: str, toc: fmt.Toc) -> LayerSource:
        by_offset = {c.blob_offset: c for e in toc.entries for c in e.chunks}
        offsets = sorted(by_offset)
        return cls(repository, blob, dict(zip(offsets, [*offsets[1:], 0])), [by_offset[o] for o in offsets])

    def ref(self, chunk: fmt.Chunk) -> ChunkRef:
        return ChunkRef.from_chunk(chunk, self.repository, self.blob, self.next_offset.get(chunk.blob_offset, 0))


class MemoryChunks:
    """Decompressed chunks by digest, least recently used dropped first, within a byte budget."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._used = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    @property
    def used(self) -> int:
        return self._used

    def get(self, digest: bytes) -> bytes | None:
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        if digest in self._items or len(data) > self._budget // 4:
            return
        self._items[digest] = data
        self._used += len(data)
        while self._used > self._budget:
            _, dropped = self._items.popitem(last=False)
            self._used -= len(dropped)


Observer = Callable[[str, fmt.Chunk], None]


class FileReader:
    def __init__(self, fetcher: ChunkFetcher, memory_bytes: int, prefetch: str, prefetch_parallel: int,
                 sequential_bytes: int = 4 << 20, streamer: Streamer | None = None) -> None:
        self._fetcher = fetcher
        self._streamer = streamer  # fetch-ahead in coalesced runs when given, else chunk by chunk
        self._memory = MemoryChunks(memory_bytes)
        self._prefetch = prefetch
        self._sequential_bytes = sequential_bytes
        self._observers: list[Observer] = []
        self._streaks: dict[int, int] = {}  # inode → where its current sequential run of reads began
        # enough queued that the origin can merge neighbours into large Range requests
        self._background = asyncio.Semaphore(max(1, prefetch_parallel))
        self._layers_started: set[str] = set()
        self._prefetched: set[tuple[str, int]] = set()
        self._tasks = TaskSet("file_reader")  # fetch-ahead and read-ahead: cancelled and awaited at close
        self._ends: dict[int, int] = {}  # inode → where its last read ended: sequential readers get read-ahead
        self._cold: set[int] = set()  # inodes a read of which missed the node's cache

    @property
    def memory_bytes(self) -> int:
        """Decompressed chunks kept in memory (within memory_cache_bytes)."""
        return self._memory.used

    def add_observer(self, fn: Observer) -> None:
        """Call `fn(layer blob digest, chunk)` for every chunk a read needs (startup profiles, the
        image's read volume): on the event loop, before the chunk is fetched; cheap, must not raise."""
        self._observers.append(fn)

    async def chunk(self, source: LayerSource, chunk: fmt.Chunk) -> bytes:
        """A chunk's verified bytes, from memory or through the fetcher, whose one flight per digest
        the kernel's concurrent pieces of a chunk share (cache tier and decompression included)."""
        data = self._memory.get(chunk.digest)
        if data is None:
            data = await self._fetcher.get(source.ref(chunk))
            self._memory.put(chunk.digest, data)  # once per digest: put ignores one already held
        return data

    @staticmethod
    def _neighbours(source: LayerSource, chunk: fmt.Chunk) -> list[fmt.Chunk]:
        at = bisect.bisect_right(source.chunks, chunk.blob_offset, key=lambda c: c.blob_offset)
        out, total = [], 0
        for c in source.chunks[at:at + NEIGHBOURS_MAX]:
            total += c.frame_length
            if total > NEIGHBOURS_BYTES:
                break
            out.append(c)
        return out

    def _read_ahead(self, source: LayerSource, chunks: list[fmt.Chunk]) -> None:
        """Decode the next chunks of a sequentially read file into memory while the kernel copies this one."""
        for chunk in chunks:
            if self._memory.get(chunk.digest) is None and not self._fetcher.loading(chunk.digest_hex):
                # a read-ahead failure is retried (and reported) by the read that needs the chunk
                self._tasks.spawn(self.chunk(source, chunk), f"read-ahead {chunk.digest_hex}", quiet=True)

    async def read(self, source: LayerSource, ino: int, chunks: list[fmt.Chunk], size: int, offset: int,
                   length: int) -> bytes:
        end = min(offset + length, size)
        if offset >= end:
            return b""
        first = bisect.bisect_right(chunks, offset, key=lambda c: c.file_offset) - 1
        last = bisect.bisect_left(chunks, end, key=lambda c: c.file_offset)
        wanted = chunks[max(first, 0):last]
        for observe in self._observers:
            for c in wanted:
                observe(source.blob, c)
        # a file whose reads the node's cache has answered so far (a second start) starts nothing over
        # the network: what its first start did not read, it does not need now. Its first miss makes
        # it cold: from then on its reads prefetch and read ahead as ever (memory hits included, which
        # are mostly the read-ahead's own work)
        missed = not all(self._memory.get(c.digest) is not None or self._fetcher.cached(c.digest_hex) for c in wanted)
        if missed:
            self._cold.add(ino)
        local = ino not in self._cold
        if len(chunks) == 1 and self._prefetch != "none" and missed:
            self._read_ahead(source, self._neighbours(source, chunks[0]))
        if len(wanted) == 1:
            parts = [await self.chunk(source, wanted[0])]
        else:
            parts = list(await asyncio.gather(*(self.chunk(source, c) for c in wanted)))
        self._ahead(source, ino, chunks, offset, end, last, local)
        return _slice(wanted, parts, offset, end)

    def _ahead(self, source: LayerSource, ino: int, chunks: list[fmt.Chunk], offset: int, end: int,
               last: int, local: bool = False) -> None:
        """After a read of [offset, end) of a file (chunks[last:] follow it): schedule what comes next.
        For a `local` file (every read of it answered by the cache so far) only cached chunks are
        read ahead, and no whole-file or layer prefetch starts."""
        # the kernel's readahead sends several requests at once, not always in order: near the last
        # read's end counts as sequential
        previous = self._ends.get(ino, 0)
        sequential = previous - SEQUENTIAL_SLACK <= offset <= previous + SEQUENTIAL_SLACK
        streak = self._streaks.get(ino, offset) if sequential else offset
        self._streaks[ino] = min(streak, offset)
        whole_file = self._prefetch in ("file", "layer") or (
            self._prefetch == "sequential" and end - self._streaks[ino] >= self._sequential_bytes)
        if local:
            pass  # a later read that misses the cache starts the prefetch
        elif self._prefetch == "layer" and source.blob not in self._layers_started:
            self._layers_started.add(source.blob)
            # the big chunks carry most of the bytes for few requests; small files stay on demand
            big = [c for c in source.chunks if c.length >= LAYER_PREFETCH_MIN_CHUNK]  # pieces of large files
            self.background(source, big, f"layer {source.blob}")
        elif whole_file and last < len(chunks) and (source.blob, ino) not in self._prefetched:
            self._prefetched.add((source.blob, ino))
            self.background(source, chunks[last:], f"file {ino:#x}")
        if sequential and last < len(chunks):
            ahead = chunks[last:last + READ_AHEAD_CHUNKS]
            self._read_ahead(source, [c for c in ahead if self._fetcher.cached(c.digest_hex)] if local else ahead)
        self._ends[ino] = max(end, previous) if offset <= previous + SEQUENTIAL_SLACK else end
        if len(self._ends) > 65536:
            self._ends.clear()
            self._streaks.clear()
            self._cold.clear()

    def background(self, source: LayerSource, chunks: list[fmt.Chunk], what: str) -> None:
        """Fetch `chunks` into the node's cache in the background, without delaying on-demand reads."""
        self._tasks.spawn(self._fetch_ahead(source, chunks, what), f"prefetch {what}")

    async def _fetch_ahead(self, source: LayerSource, chunks: list[fmt.Chunk], what: str) -> None:
        async def one(chunk: fmt.Chunk) -> None:
            async with self._background:
                try:
                    await self._fetcher.ensure(source.ref(chunk), use_peers=True, background=True)
                except Exception as exc:  # a read of this chunk will retry and report it
                    log.info("prefetch_chunk_failed", blob=source.blob, digest=chunk.digest_hex, error=str(exc))

        seen: set[bytes] = set()
        unique = [c for c in chunks if not (c.digest in seen or seen.add(c.digest))]  # type: ignore[func-returns-value]
        log.debug("prefetch_started", what=what, blob=source.blob, chunks=len(unique))
        if self._streamer is not None:
            await self._streamer.stream([source.ref(c) for c in unique], f"prefetch {what}", quiet=True)
            return
        await asyncio.gather(*(one(c) for c in unique))

    async def close(self) -> None:
        await self._tasks.close()  # the fetcher's flights are closed by its owner (cancel_fetches)


def _slice(chunks: list[fmt.Chunk], frames: list[bytes], offset: int, end: int) -> bytes:
    """Bytes [offset, end) of a file from the frames holding its `chunks`: each frame's part is cut
    out (at its frame_offset) and only the parts are joined, never the whole frames."""
    if len(chunks) == 1:
        c = chunks[0]
        start = c.frame_offset + offset - c.file_offset
        return frames[0][start:start + end - offset]
    parts = []
    for c, frame in zip(chunks, frames):
        lo = max(offset, c.file_offset) - c.file_offset + c.frame_offset
        hi = min(end, c.file_offset + c.length) - c.file_offset + c.frame_offset
        parts.append(memoryview(frame)[lo:hi])
    return b"".join(parts)
