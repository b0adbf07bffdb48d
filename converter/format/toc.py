"""The seekable layer format, versions 1 and 2: constants, footer and table of contents (TOC).

docs/format.md is the normative description; this module is its executable form. Decoding
treats every byte as hostile: anything malformed raises `FormatError`, never another exception.
"""

from __future__ import annotations

import posixpath
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import zstandard

from converter.format.digest import raw_to_digest
from converter.format.errors import FormatError, NoFooterError

FORMAT_VERSION = 2  # written by default; version 1 layers still read
SUPPORTED_VERSIONS = (1, 2)
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: small enough for lazy reads, large enough for ranged throughput
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
DEFAULT_COMPRESSION_LEVEL = 3


def pack_threshold(chunk_size: int) -> int:
    """Version 2: regular files smaller than this share frames; larger ones get chunk-aligned frames."""
    return chunk_size // 4

# zstd skippable frames: magic 0x184D2A50..0x184D2A5F, then a u32 LE payload size (zstd format fact).
SKIPPABLE_HEADER = struct.Struct("<II")
TOC_FRAME_MAGIC = 0x184D2A5E
FOOTER_FRAME_MAGIC = 0x184D2A5F
FOOTER_MAGIC = b"PEERPULL"
# payload: magic, version u16, flags u16, reserved u32, toc_offset u64, toc_length u64,
# toc_uncompressed u64, reserved u64
_FOOTER_PAYLOAD = struct.Struct("<8sHHIQQQQ")
FOOTER_SIZE = SKIPPABLE_HEADER.size + _FOOTER_PAYLOAD.size  # 56 bytes
MAX_TOC_BYTES = 256 << 20  # uncompressed; far above any real image, below a memory blow-up

# Manifest layer annotations.
ANNOTATION_VERSION = "io.peerpull.layer.version"
ANNOTATION_TOC_DIGEST = "io.peerpull.toc.digest"
ANNOTATION_TOC_OFFSET = "io.peerpull.toc.offset"
ANNOTATION_TOC_LENGTH = "io.peerpull.toc.length"
ANNOTATION_CHUNK_SIZE = "io.peerpull.chunk.size"
ANNOTATION_SOURCE_DIGEST = "io.peerpull.source.digest"
ANNOTATION_IMAGE_SOURCE = "io.peerpull.source.manifest"

# TOC entry types.
FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO, WHITEOUT, OPAQUE = (
    "file", "dir", "symlink", "hardlink", "char", "block", "fifo", "whiteout", "opaque",
)
ENTRY_TYPES = frozenset({FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO, WHITEOUT, OPAQUE})
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


class _ChunkFields(NamedTuple):
    file_offset: int
    length: int  # uncompressed bytes of this file's piece
    blob_offset: int  # offset of the zstd frame in the layer blob
    compressed_length: int  # bytes of the zstd frame
    digest: bytes  # sha256 of the frame's whole uncompressed bytes, 32 raw bytes
    frame_offset: int = 0  # where the piece starts in the frame's uncompressed bytes (0 in version 1)
    frame_length: int = 0  # the frame's uncompressed size (equals `length` in version 1)


class Chunk(_ChunkFields):
    """One file's piece of content and the frame holding it: where it sits in the file, in the frame
    and in the blob. In version 2 several files' pieces may share a frame (same blob_offset and
    digest); the frame, not the piece, is what is fetched, verified and cached."""

    __slots__ = ()

    def __new__(cls, file_offset: int, length: int, blob_offset: int, compressed_length: int, digest: bytes,
                frame_offset: int = 0, frame_length: int = 0) -> Chunk:
        # frame_length 0: a frame holding exactly this piece, as every frame of version 1
        return tuple.__new__(cls, (file_offset, length, blob_offset, compressed_length, digest, frame_offset,
                                   frame_length or length))

    @property
    def digest_hex(self) -> str:
        return raw_to_digest(self.digest)


@dataclass(slots=True)  # one per file: a layer may list hundreds of thousands
class TocEntry:
    path: str  # normalized: relative, no leading "./" or "/", no trailing "/", "." is the root
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    link: str = ""  # symlink target (verbatim) or hardlink target (normalized path)
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class Toc:
    chunk_size: int
    entries: list[TocEntry]
    version: int = FORMAT_VERSION

    @property
    def chunk_count(self) -> int:
        """File pieces listed (one per file per frame it has bytes in)."""
        return sum(len(e.chunks) for e in self.entries)

    @property
    def frame_count(self) -> int:
        """Distinct content frames: what a node fetches, verifies and caches."""
        return len({c.blob_offset for e in self.entries for c in e.chunks})


@dataclass(frozen=True)
class Footer:
    toc_offset: int
    toc_length: int  # the whole TOC skippable frame, header included
    toc_uncompressed: int
    version: int = FORMAT_VERSION


def normalize_path(name: str) -> str:
    """Tar member name → TOC path; refuses names that would leave the layer's root."""
    if "\0" in name:
        raise FormatError(f"path with a NUL byte: {name[:80]!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"path escapes the layer root: {name[:200]!r}")
    return "/".join(parts) or "."


def classify_whiteout(path: str) -> tuple[str, str] | None:
    """(type, target path) when `path` is an OCI whiteout or opaque marker, else None."""
    parent, base = posixpath.split(path)
    if base == OPAQUE_MARKER:
        return OPAQUE, parent or "."
    if base.startswith(WHITEOUT_PREFIX) and len(base) > len(WHITEOUT_PREFIX):
        return WHITEOUT, posixpath.join(parent, base[len(WHITEOUT_PREFIX):])
    return None


# ---- footer -------------------------------------------------------------------------------

def encode_footer(footer: Footer) -> bytes:
    payload = _FOOTER_PAYLOAD.pack(
        FOOTER_MAGIC, footer.version, 0, 0, footer.toc_offset, footer.toc_length, footer.toc_uncompressed, 0
    )
    return SKIPPABLE_HEADER.pack(FOOTER_FRAME_MAGIC, len(payload)) + payload


def decode_footer(tail: bytes, blob_size: int) -> Footer:
    """Parse the footer from the last FOOTER_SIZE bytes of a blob of `blob_size` bytes."""
    if len(tail) != FOOTER_SIZE or blob_size < FOOTER_SIZE:
        raise NoFooterError("blob too short for a peerpull footer: not a seekable layer")
    magic, size = SKIPPABLE_HEADER.unpack_from(tail)
    if magic != FOOTER_FRAME_MAGIC or size != _FOOTER_PAYLOAD.size:
        raise NoFooterError("no peerpull footer at the end of the blob: not a seekable layer")
    fmagic, version, _flags, _r1, toc_offset, toc_length, toc_uncompressed, _r2 = _FOOTER_PAYLOAD.unpack_from(
        tail, SKIPPABLE_HEADER.size
    )
    if fmagic != FOOTER_MAGIC:
        raise NoFooterError("footer magic mismatch: not a seekable layer")
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"seekable layer format version {version} is not supported (this reads "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    if toc_length <= SKIPPABLE_HEADER.size or toc_offset + toc_length + FOOTER_SIZE != blob_size:
        raise NoFooterError("footer locates the TOC outside the blob")  # no usable footer: as if none
    if toc_uncompressed > MAX_TOC_BYTES:
        raise FormatError(f"TOC claims {toc_uncompressed} bytes, above the {MAX_TOC_BYTES} limit")
    if toc_length > MAX_TOC_BYTES:  # read before it is decompressed: bounded on its own
        raise FormatError(f"TOC frame claims {toc_length} bytes, above the {MAX_TOC_BYTES} limit")
    return Footer(toc_offset, toc_length, toc_uncompressed, version)


# ---- TOC ----------------------------------------------------------------------------------

def _entry_to_wire(e: TocEntry, frames: dict[int, int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"path": e.path, "type": e.type, "mode": e.mode, "uid": e.uid, "gid": e.gid}
    optional = {
        "uname": e.uname, "gname": e.gname, "mtime": e.mtime, "mtime_nsec": e.mtime_nsec, "size": e.size,
        "link": e.link, "devmajor": e.devmajor, "devminor": e.devminor, "xattrs": e.xattrs,
    }
    out.update({k: v for k, v in optional.items() if v})
    if e.chunks:
        if frames is None:  # version 1: the piece is the frame
            out["chunks"] = [list(c[:5]) for c in e.chunks]
        else:
            out["chunks"] = [[c.file_offset, c.length, frames[c.blob_offset], c.frame_offset] for c in e.chunks]
    return out


def _frames_table(toc: Toc) -> tuple[list[list[Any]], dict[int, int]]:
    """Version 2: the distinct frames in blob order, and each one's index by blob offset."""
    by_offset: dict[int, Chunk] = {}
    for e in toc.entries:
        for c in e.chunks:
            by_offset.setdefault(c.blob_offset, c)
    offsets = sorted(by_offset)
    table = [[o, by_offset[o].compressed_length, by_offset[o].frame_length, by_offset[o].digest] for o in offsets]
    return table, {o: i for i, o in enumerate(offsets)}


def encode_toc(toc: Toc, level: int = DEFAULT_COMPRESSION_LEVEL) -> tuple[bytes, int]:
    """The TOC skippable frame (header + zstd-compressed msgpack) and the msgpack length."""
    if toc.version not in SUPPORTED_VERSIONS:
        raise FormatError(f"cannot write format version {toc.version}")
    wire: dict[str, Any] = {"version": toc.version, "chunk_size": toc.chunk_size}
    index: dict[int, int] | None = None
    if toc.version >= 2:
        wire["frames"], index = _frames_table(toc)
    wire["entries"] = [_entry_to_wire(e, index) for e in toc.entries]
    packed = msgpack.packb(wire, use_bin_type=True)
    compressed = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(packed)
    return SKIPPABLE_HEADER.pack(TOC_FRAME_MAGIC, len(compressed)) + compressed, len(packed)


def _want(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    # bool is an int subclass; a TOC never has booleans where numbers belong
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FormatError(f"TOC: {what} has the wrong type ({type(value).__name__})")
    return value


def _uint(value: Any, what: str, limit: int = 1 << 63) -> int:
    v: int = _want(value, int, what)
    if not 0 <= v < limit:
        raise FormatError(f"TOC: {what} out of range ({v})")
    return v


_INT_FIELDS = {"mode": 1 << 16, "uid": 1 << 32, "gid": 1 << 32, "mtime_nsec": 10**9, "size": 1 << 63,
               "devmajor": 1 << 32, "devminor": 1 << 32}
_STR_FIELDS = frozenset({"uname", "gname", "link"})


def _plainly_normalized(path: str) -> bool:
    """A cheap sufficient test (no component starts with a dot, no empty one): most paths pass it,
    the rest go through normalize_path."""
    return (path != "" and path[0] not in "./" and path[-1] != "/" and "/." not in path and "//" not in path
            and "\0" not in path)


def _decode_entry(raw: Any, chunk_size: int, data_end: int, frames: list[_Frame] | None) -> TocEntry:
    # One pass over the fields that are present, with exact type checks (bool is not an int here):
    # a node parses tens of thousands of entries per layer while containerd waits.
    if type(raw) is not dict:
        raise FormatError(f"TOC: entry has the wrong type ({type(raw).__name__})")
    path = raw.get("path")
    if type(path) is not str:
        raise FormatError(f"TOC: path has the wrong type ({type(path).__name__})")
    if not _plainly_normalized(path) and normalize_path(path) != path:
        raise FormatError(f"TOC: path not normalized: {path[:200]!r}")
    etype = raw.get("type")
    if type(etype) is not str:
        raise FormatError(f"TOC: type has the wrong type ({type(etype).__name__})")
    if etype not in ENTRY_TYPES:
        raise FormatError(f"TOC: unknown entry type {etype[:40]!r}")
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        limit = _INT_FIELDS.get(key)
        if limit is not None:
            if type(value) is not int or not 0 <= value < limit:
                raise FormatError(f"TOC: {key} has the wrong type or is out of range")
            fields[key] = value
        elif key in _STR_FIELDS:
            if type(value) is not str:
                raise FormatError(f"TOC: {key} has the wrong type ({type(value).__name__})")
            fields[key] = value
        elif key == "mtime":
            if type(value) is not int:
                raise FormatError(f"TOC: mtime has the wrong type ({type(value).__name__})")
            fields[key] = value
    xattrs = raw.get("xattrs")
    if xattrs is None:
        xattrs = {}
    elif type(xattrs) is not dict:
        raise FormatError(f"TOC: xattrs has the wrong type ({type(xattrs).__name__})")
    for k, v in xattrs.items():
        if type(k) is not str or type(v) is not bytes:
            raise FormatError("TOC: an xattr has the wrong type")
    entry = TocEntry(path=path, type=etype, xattrs=xattrs, **fields)
    chunks_raw = raw.get("chunks", ())
    if type(chunks_raw) is not list and chunks_raw != ():
        raise FormatError(f"TOC: chunks has the wrong type ({type(chunks_raw).__name__})")
    if etype != FILE and chunks_raw:
        raise FormatError(f"TOC: {etype} entry {path[:200]!r} has chunks")
    if frames is not None:
        covered = _decode_pieces(chunks_raw, frames, path, entry.chunks)
    else:
        covered = _decode_v1_chunks(chunks_raw, chunk_size, data_end, path, entry.chunks)
    if etype == FILE and covered != entry.size:
        raise FormatError(f"TOC: chunks of {path[:200]!r} cover {covered} of {entry.size} bytes")
    return entry


def _decode_v1_chunks(raw: list[Any], chunk_size: int, data_end: int, path: str, out: list[Chunk]) -> int:
    """Version 1 chunks `[file_offset, length, blob_offset, compressed_length, sha256]`: one frame each."""
    expected_offset = 0
    append = out.append
    for c in raw:
        if type(c) is not list or len(c) != 5:
            raise FormatError("TOC: a chunk is a list of 5 fields")
        file_offset, length, blob_offset, clen, digest = c
        if not (type(file_offset) is int and type(length) is int and type(blob_offset) is int
                and type(clen) is int and type(digest) is bytes):
            raise FormatError(f"TOC: a chunk of {path[:200]!r} has fields of the wrong type")
        if file_offset != expected_offset or not 0 < length <= chunk_size or len(digest) != 32:
            raise FormatError(f"TOC: chunks of {path[:200]!r} do not tile the file")
        if clen <= 0 or blob_offset < 0 or blob_offset + clen > data_end:
            raise FormatError(f"TOC: a chunk of {path[:200]!r} lies outside the layer data")
        expected_offset += length
        append(Chunk(file_offset, length, blob_offset, clen, digest))
    return expected_offset


class _Frame(NamedTuple):
    blob_offset: int
    compressed_length: int
    frame_length: int
    digest: bytes


def _decode_frames(raw: Any, chunk_size: int, data_end: int) -> list[_Frame]:
    """Version 2's frame table: distinct frames in blob order, each inside the layer data."""
    frames: list[_Frame] = []
    previous_end = 0
    for f in _want(raw, list, "frames"):
        if type(f) is not list or len(f) != 4:
            raise FormatError("TOC: a frame is a list of 4 fields")
        blob_offset, clen, flen, digest = f
        if not (type(blob_offset) is int and type(clen) is int and type(flen) is int and type(digest) is bytes):
            raise FormatError("TOC: a frame has fields of the wrong type")
        if len(digest) != 32 or not 0 < flen <= chunk_size or not 0 < clen <= 2 * chunk_size + 4096:
            raise FormatError(f"TOC: frame at {blob_offset} has a bad size or digest")
        if blob_offset < previous_end or blob_offset + clen > data_end:
            raise FormatError(f"TOC: frame at {blob_offset} overlaps another or lies outside the layer data")
        previous_end = blob_offset + clen
        frames.append(_Frame(blob_offset, clen, flen, digest))
    return frames


def _decode_pieces(raw: list[Any], frames: list[_Frame], path: str, out: list[Chunk]) -> int:
    """Version 2 pieces `[file_offset, length, frame index, frame_offset]`, tiling the file in order."""
    expected = 0
    count = len(frames)
    new = tuple.__new__  # the fields are complete: skip Chunk.__new__'s default
    append = out.append
    for c in raw:
        if type(c) is not list or len(c) != 4:
            raise FormatError("TOC: a chunk is a list of 4 fields")
        file_offset, length, index, frame_offset = c
        if not (type(file_offset) is int and type(length) is int and type(index) is int
                and type(frame_offset) is int):
            raise FormatError(f"TOC: a chunk of {path[:200]!r} has fields of the wrong type")
        if file_offset != expected or length <= 0:
            raise FormatError(f"TOC: chunks of {path[:200]!r} do not tile the file")
        if not 0 <= index < count:
            raise FormatError(f"TOC: a chunk of {path[:200]!r} names frame {index} of {count}")
        frame = frames[index]
        if frame_offset < 0 or frame_offset + length > frame.frame_length:
            raise FormatError(f"TOC: a chunk of {path[:200]!r} overruns its frame")
        expected += length
        append(new(Chunk, (file_offset, length, frame.blob_offset, frame.compressed_length, frame.digest,
                           frame_offset, frame.frame_length)))
    return expected


def check_frame_size(frame: bytes, limit: int, what: str) -> None:
    """Refuse a zstd frame whose header announces more than `limit` bytes, before anything is
    allocated for it (a hostile frame could otherwise ask for any amount of memory)."""
    size = zstandard.frame_content_size(frame)  # -1 when the header does not say
    if size > limit:
        raise FormatError(f"{what}: frame announces {size} bytes, at most {limit} expected")


def decode_toc(frame: bytes, footer: Footer) -> Toc:
    """Parse and validate a TOC skippable frame located by `footer`."""
    if len(frame) != footer.toc_length:
        raise FormatError("TOC frame has the wrong length")
    magic, size = SKIPPABLE_HEADER.unpack_from(frame)
    if magic != TOC_FRAME_MAGIC or size != len(frame) - SKIPPABLE_HEADER.size:
        raise FormatError("TOC frame header mismatch")
    try:
        body = frame[SKIPPABLE_HEADER.size:]
        check_frame_size(body, footer.toc_uncompressed, "TOC")
        packed = zstandard.ZstdDecompressor().decompress(body, max_output_size=footer.toc_uncompressed)
    except zstandard.ZstdError as exc:
        raise FormatError(f"TOC does not decompress: {exc}") from None
    if len(packed) != footer.toc_uncompressed:
        raise FormatError("TOC size differs from the footer's")
    try:
        wire = msgpack.unpackb(packed, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise FormatError(f"TOC is not valid msgpack: {exc}") from None
    wire = _want(wire, dict, "TOC")
    if wire.get("version") != footer.version:
        raise FormatError(f"TOC version {str(wire.get('version'))[:20]!r} differs from the footer's {footer.version}")
    chunk_size = _uint(wire.get("chunk_size"), "chunk_size", MAX_CHUNK_SIZE + 1)
    if chunk_size < MIN_CHUNK_SIZE:
        raise FormatError(f"TOC chunk size {chunk_size} below the minimum")
    frames = _decode_frames(wire.get("frames"), chunk_size, footer.toc_offset) if footer.version >= 2 else None
    entries = [_decode_entry(e, chunk_size, footer.toc_offset, frames)
               for e in _want(wire.get("entries"), list, "entries")]
    return Toc(chunk_size=chunk_size, entries=entries, version=footer.version)
