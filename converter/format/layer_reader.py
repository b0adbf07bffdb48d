"""Read a seekable layer through ranged reads only: footer and TOC from the tail, chunks alone.

Every chunk is verified against the TOC's digest after decompression; nothing unverified leaves
this module. The reader is a `RangeReader` seam, so the same code serves a local file, a registry
blob (HTTP Range) or a test fake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import zstandard

from converter.format import toc as fmt
from converter.format.digest import sha256_digest
from converter.format.errors import DigestMismatchError, FormatError, NoFooterError

# One tail read usually brings the footer and the whole TOC.
TAIL_READ_BYTES = 256 << 10
# bytes between the announced TOC frame and the blob's end beyond the footer that the one TOC
# read still takes along (a converter that put something there); more, and the tail is read instead
TOC_SPAN_SLACK = 64 << 10


class RangeReader(Protocol):
    """Random access to one blob of known size."""

    size: int

    async def read_range(self, offset: int, length: int) -> bytes: ...


class FileRangeReader:
    """A `RangeReader` over a local file (tests, inspection of a downloaded blob)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self.size = os.path.getsize(self._path)

    async def read_range(self, offset: int, length: int) -> bytes:
        with open(self._path, "rb") as f:
            f.seek(offset)
            return f.read(length)


@dataclass(frozen=True)
class TocLocation:
    """Where the manifest annotations say the TOC is, and its digest."""

    digest: str
    offset: int
    length: int


def location_from_annotations(annotations: dict[str, str] | None) -> TocLocation | None:
    """The TOC location announced by a manifest layer descriptor, or None if not seekable."""
    if not annotations or fmt.ANNOTATION_TOC_DIGEST not in annotations:
        return None
    try:
        location = TocLocation(
            digest=annotations[fmt.ANNOTATION_TOC_DIGEST],
            offset=int(annotations[fmt.ANNOTATION_TOC_OFFSET]),
            length=int(annotations[fmt.ANNOTATION_TOC_LENGTH]),
        )
    except (KeyError, ValueError, TypeError):
        raise FormatError("layer annotations name a TOC but its offset/length are missing or not numbers") from None
    if location.offset < 0 or not 0 < location.length <= fmt.MAX_TOC_BYTES:
        raise FormatError(f"layer annotations place the TOC at {location.offset} with {location.length} bytes "
                          f"(at most {fmt.MAX_TOC_BYTES})")
    return location


async def _read_exact(reader: RangeReader, offset: int, length: int, what: str) -> bytes:
    data = await reader.read_range(offset, length)
    if len(data) != length:
        raise FormatError(f"{what}: wanted {length} bytes at offset {offset}, got {len(data)} (truncated blob?)")
    return data


async def read_toc_frame(reader: RangeReader, expected: TocLocation | None = None) -> tuple[fmt.Footer, bytes]:
    """Locate the TOC frame of the blob behind `reader`: its footer and the raw frame bytes.

    With `expected` (from the manifest annotations) the footer must agree with it and the TOC
    frame must hash to its digest, and TOC and footer come in one Range request from the TOC's
    offset to the blob's end: no tail read that would also bring the last chunk frames along.
    """
    size = reader.size
    if size < fmt.FOOTER_SIZE:
        raise NoFooterError("blob too short for a peerpull footer: not a seekable layer")
    if expected is not None and 0 < size - expected.offset <= expected.length + TOC_SPAN_SLACK:
        tail_start = expected.offset
    else:
        tail_start = size - min(size, TAIL_READ_BYTES)
    tail = await _read_exact(reader, tail_start, size - tail_start, "layer tail")
    footer = fmt.decode_footer(tail[-fmt.FOOTER_SIZE:], size)
    if expected is not None and (expected.offset, expected.length) != (footer.toc_offset, footer.toc_length):
        raise FormatError("footer and manifest annotations disagree on where the TOC is")
    if footer.toc_offset >= tail_start:
        rel = footer.toc_offset - tail_start
        frame = tail[rel : rel + footer.toc_length]
    else:
        frame = await _read_exact(reader, footer.toc_offset, footer.toc_length, "TOC")
    if expected is not None and sha256_digest(frame) != expected.digest:
        raise DigestMismatchError("TOC digest does not match the manifest annotation")
    return footer, frame


async def read_toc(reader: RangeReader, expected: TocLocation | None = None) -> tuple[fmt.Footer, fmt.Toc]:
    """Locate and parse the TOC of the blob behind `reader` (see read_toc_frame)."""
    footer, frame = await read_toc_frame(reader, expected)
    return footer, fmt.decode_toc(frame, footer)


def decompress_chunk(frame: bytes, chunk: fmt.Chunk) -> bytes:
    """Decompress the frame holding `chunk` and verify it: the frame's whole uncompressed bytes
    (`chunk.frame_length` of them), never just the piece. Raises FormatError / DigestMismatchError."""
    if len(frame) != chunk.compressed_length:
        raise FormatError(f"chunk {chunk.digest_hex}: frame is {len(frame)} bytes, TOC says {chunk.compressed_length}")
    size = chunk.frame_length
    try:
        fmt.check_frame_size(frame, size, f"chunk {chunk.digest_hex}")
        # a decompressor per call: instances are not safe to share between threads
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"chunk {chunk.digest_hex}: frame does not decompress: {exc}") from None
    if len(data) != size:
        raise FormatError(f"chunk {chunk.digest_hex}: {len(data)} bytes after decompression, TOC says {size}")
    actual = sha256_digest(data)
    if actual != chunk.digest_hex:
        raise DigestMismatchError(f"chunk {chunk.digest_hex}: content hashes to {actual}")
    return data


def piece(frame_data: bytes, chunk: fmt.Chunk) -> bytes:
    """The file's bytes of `chunk` inside its verified frame's uncompressed bytes."""
    if chunk.frame_offset == 0 and chunk.length == len(frame_data):
        return frame_data
    return frame_data[chunk.frame_offset:chunk.frame_offset + chunk.length]


async def read_chunk(reader: RangeReader, chunk: fmt.Chunk) -> bytes:
    """Fetch the frame of one chunk with a single ranged read, verify it, and return the file's piece."""
    frame = await _read_exact(reader, chunk.blob_offset, chunk.compressed_length, f"chunk {chunk.digest_hex}")
    return piece(decompress_chunk(frame, chunk), chunk)
