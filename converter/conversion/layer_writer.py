"""Write a seekable layer from an uncompressed tar stream.

The output decompresses (as one zstd stream) to exactly the input tar, byte for byte. Version 2:
small files travel whole with their headers and padding in shared frames of at most the chunk
size; a larger file's content is cut at fixed offsets into frames of its own. Version 1: headers
and padding go into "header frames" and every file's content into frames of its own. Then the TOC
and the footer follow as skippable frames.
Memory stays bounded by the number of frames in flight, whatever the layer size.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from converter.conversion.tarstream import BLOCKDEV, CHAR, DIRECTORY, FIFO, HARDLINK, SYMLINK, TarMember, TarWalker
from converter.format import toc as fmt
from converter.format.digest import DigestWriter, sha256_digest
from converter.format.errors import FormatError

_TYPE_NAMES = {DIRECTORY: fmt.DIR, SYMLINK: fmt.SYMLINK, HARDLINK: fmt.HARDLINK, CHAR: fmt.CHAR,
               BLOCKDEV: fmt.BLOCK, FIFO: fmt.FIFO}


@dataclass(frozen=True)
class LayerResult:
    digest: str  # of the written blob
    size: int
    diff_id: str  # sha256 of the uncompressed tar (equal to the source's)
    uncompressed_size: int
    toc_digest: str
    toc_offset: int
    toc_length: int
    toc_uncompressed: int
    entries: int
    chunks: int  # file pieces listed in the TOC
    frames: int = 0  # distinct content frames (equal to chunks in version 1)
    format_version: int = fmt.FORMAT_VERSION
    toc: fmt.Toc | None = field(default=None, repr=False, compare=False)  # the written TOC, for its caller


def toc_entry_for(member: TarMember) -> fmt.TocEntry:
    """The TOC entry describing one tar member (whiteouts already mapped to their targets)."""
    path = fmt.normalize_path(member.name)
    etype = fmt.FILE if member.is_regular else _TYPE_NAMES[member.typeflag]
    if etype == fmt.FILE and (wh := fmt.classify_whiteout(path)):
        etype, path = wh
    link = member.linkname
    if etype == fmt.HARDLINK:
        link = fmt.normalize_path(link)
    return fmt.TocEntry(
        path=path, type=etype, mode=member.mode, uid=member.uid, gid=member.gid, uname=member.uname,
        gname=member.gname, mtime=member.mtime, mtime_nsec=member.mtime_nsec,
        size=member.size if etype == fmt.FILE else 0, link=link if etype in (fmt.SYMLINK, fmt.HARDLINK) else "",
        devmajor=member.devmajor, devminor=member.devminor, xattrs=dict(member.xattrs),
    )


class _CountingOut:
    """Writes to the blob while hashing and counting, so the digest needs no second pass."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.hash = DigestWriter()

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self.hash.update(data)


class _FramePipeline:
    """Compresses frames on a thread pool and writes them strictly in submission order.

    zstd and sha256 release the GIL, so a layer uses every core; the bounded queue keeps memory
    at about `2 × depth × chunk_size`.
    """

    def __init__(self, out: _CountingOut, level: int, workers: int, depth: int) -> None:
        self._out = out
        self._level = level
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="zstd")
        self._queue: deque[tuple[Future[tuple[bytes, bytes]], Callable[[int, int, bytes], None] | None]] = deque()
        self._depth = max(2, depth)
        self._compressors: dict[int, zstandard.ZstdCompressor] = {}

    def _compress(self, data: bytes, want_digest: bool) -> tuple[bytes, bytes]:
        key = threading.get_ident()
        comp = self._compressors.get(key)
        if comp is None:
            comp = self._compressors[key] = zstandard.ZstdCompressor(
                level=self._level, write_checksum=True, write_content_size=True
            )
        digest = hashlib.sha256(data).digest() if want_digest else b""
        return comp.compress(data), digest

    def submit(self, data: bytes, on_written: Callable[[int, int, bytes], None] | None = None) -> None:
        """Queue one frame; `on_written(blob_offset, compressed_length, digest)` runs once it is written."""
        self._queue.append((self._pool.submit(self._compress, data, on_written is not None), on_written))
        while len(self._queue) > self._depth:
            self._drain_one()

    def _drain_one(self) -> None:
        future, on_written = self._queue.popleft()
        frame, digest = future.result()
        offset = self._out.hash.size
        self._out.write(frame)
        if on_written is not None:
            on_written(offset, len(frame), digest)

    def flush(self) -> None:
        while self._queue:
            self._drain_one()

    def close(self) -> None:
        for future, _ in self._queue:
            future.cancel()
        self._pool.shutdown(wait=True)


class _HashingReader:
    """Hashes the uncompressed tar as the walker reads it: that is the layer's diff_id."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.hash = DigestWriter()

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self.hash.update(data)
        return data


def write_seekable_layer(
    src: BinaryIO,
    out: BinaryIO,
    *,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    level: int = fmt.DEFAULT_COMPRESSION_LEVEL,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    format_version: int = fmt.FORMAT_VERSION,
) -> LayerResult:
    """Convert the uncompressed tar stream `src` into a seekable layer written to `out`.

    `progress(n)` is called with the number of uncompressed bytes consumed since the last call.
    """
    if not fmt.MIN_CHUNK_SIZE <= chunk_size <= fmt.MAX_CHUNK_SIZE:
        raise FormatError(f"chunk size must be between {fmt.MIN_CHUNK_SIZE} and {fmt.MAX_CHUNK_SIZE} bytes")
    if format_version not in fmt.SUPPORTED_VERSIONS:
        raise FormatError(f"format version must be one of {', '.join(map(str, fmt.SUPPORTED_VERSIONS))}")
    reader = _HashingReader(src)
    walker = TarWalker(reader)  # type: ignore[arg-type]
    counting = _CountingOut(out)
    pipeline = _FramePipeline(counting, level, workers, depth=4 * max(1, workers))
    entries: list[fmt.TocEntry] = []
    framer: _HeaderFrames = (_PackedFrames if format_version >= 2 else _HeaderFrames)(pipeline, chunk_size)
    small = fmt.pack_threshold(chunk_size) if format_version >= 2 else 0  # below: packed with its neighbours
    reported = 0

    def report() -> None:
        nonlocal reported
        if progress is not None and walker.offset - reported >= (8 << 20):
            progress(walker.offset - reported)
            reported = walker.offset

    try:
        while (member := walker.next_member()) is not None:
            entry = toc_entry_for(member)
            entries.append(entry)
            framer.stream(member.raw_header)
            if 0 < member.size < small:
                framer.piece(entry, walker.read_data(member.size))
            elif member.size:
                framer.flush()
                file_offset = 0
                while file_offset < member.size:
                    data = walker.read_data(chunk_size)
                    pipeline.submit(data, _chunk_recorder(entry, file_offset, len(data)))
                    file_offset += len(data)
                    report()
            framer.stream(walker.padding())
            framer.settle()
            report()
        while trailer := walker.read_trailer(chunk_size):
            framer.stream(trailer)
            framer.settle()
        framer.flush()
        pipeline.flush()
    finally:
        pipeline.close()
    if progress is not None and walker.offset > reported:
        progress(walker.offset - reported)

    toc = fmt.Toc(chunk_size=chunk_size, entries=entries, version=format_version)
    toc_frame, toc_uncompressed = fmt.encode_toc(toc)
    toc_offset = counting.hash.size
    counting.write(toc_frame)
    counting.write(fmt.encode_footer(fmt.Footer(toc_offset, len(toc_frame), toc_uncompressed, format_version)))
    return LayerResult(
        digest=counting.hash.digest, size=counting.hash.size, diff_id=reader.hash.digest,
        uncompressed_size=reader.hash.size, toc_digest=sha256_digest(toc_frame), toc_offset=toc_offset,
        toc_length=len(toc_frame), toc_uncompressed=toc_uncompressed, entries=len(entries),
        chunks=toc.chunk_count, frames=toc.frame_count, format_version=format_version, toc=toc,
    )


class _HeaderFrames:
    """Version 1: what is not file content (headers, padding, end of archive) waits here and becomes
    a header frame before the next content, or once it reaches the chunk size."""

    def __init__(self, pipeline: _FramePipeline, chunk_size: int) -> None:
        self._pipeline = pipeline
        self._size = chunk_size
        self._buf = bytearray()

    def stream(self, data: bytes) -> None:
        self._buf += data

    def settle(self) -> None:
        if len(self._buf) >= self._size:
            self.flush()

    def piece(self, entry: fmt.TocEntry, content: bytes) -> None:
        raise AssertionError("version 1 packs no file content")

    def flush(self) -> None:
        if self._buf:
            self._pipeline.submit(bytes(self._buf))
            self._buf.clear()


class _PackedFrames(_HeaderFrames):
    """Version 2: the tar stream cut into frames of at most the chunk size, small files' contents
    whole inside them along with the headers and padding around them."""

    def __init__(self, pipeline: _FramePipeline, chunk_size: int) -> None:
        super().__init__(pipeline, chunk_size)
        self._pieces: list[tuple[fmt.TocEntry, int, int]] = []  # (entry, frame_offset, length) in _buf

    def stream(self, data: bytes) -> None:
        # no piece ends past the chunk size, so a cut there never splits one
        self._buf += data
        while len(self._buf) >= self._size:
            self._emit(self._size)

    def settle(self) -> None:
        pass

    def piece(self, entry: fmt.TocEntry, content: bytes) -> None:
        if len(self._buf) + len(content) > self._size:
            self.flush()
        self._pieces.append((entry, len(self._buf), len(content)))
        self._buf += content

    def flush(self) -> None:
        if self._buf:
            self._emit(len(self._buf))

    def _emit(self, n: int) -> None:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        pieces, self._pieces = self._pieces, []
        self._pipeline.submit(data, _pieces_recorder(pieces, n) if pieces else None)


def _pieces_recorder(pieces: list[tuple[fmt.TocEntry, int, int]], frame_length: int) -> Callable[[int, int, bytes], None]:
    def record(blob_offset: int, compressed_length: int, digest: bytes) -> None:
        for entry, frame_offset, length in pieces:
            entry.chunks.append(fmt.Chunk(0, length, blob_offset, compressed_length, digest, frame_offset,
                                          frame_length))

    return record


def _chunk_recorder(entry: fmt.TocEntry, file_offset: int, length: int) -> Callable[[int, int, bytes], None]:
    def record(blob_offset: int, compressed_length: int, digest: bytes) -> None:
        entry.chunks.append(fmt.Chunk(file_offset, length, blob_offset, compressed_length, digest))

    return record
