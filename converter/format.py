"""The seekable layer format, version 1: constants, footer and table of contents (TOC).

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

from converter.errors import FormatError

FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: small enough for lazy reads, large enough for ranged throughput
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
DEFAULT_COMPRESSION_LEVEL = 3

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


class Chunk(NamedTuple):
    """One frame of file content: where it sits in the file and in the blob, and its identity."""

    file_offset: int
    length: int  # uncompressed bytes
    blob_offset: int  # offset of the zstd frame in the layer blob
    compressed_length: int  # bytes of the zstd frame
    digest: bytes  # sha256 of the uncompressed bytes, 32 raw bytes

    @property
    def digest_hex(self) -> str:
        return "sha256:" + self.digest.hex()


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

    @property
    def chunk_count(self) -> int:
        return sum(len(e.chunks) for e in self.entries)


@dataclass(frozen=True)
class Footer:
    toc_offset: int
    toc_length: int  # the whole TOC skippable frame, header included
    toc_uncompressed: int


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
        FOOTER_MAGIC, FORMAT_VERSION, 0, 0, footer.toc_offset, footer.toc_length, footer.toc_uncompressed, 0
    )
    return SKIPPABLE_HEADER.pack(FOOTER_FRAME_MAGIC, len(payload)) + payload


def decode_footer(tail: bytes, blob_size: int) -> Footer:
    """Parse the footer from the last FOOTER_SIZE bytes of a blob of `blob_size` bytes."""
    if len(tail) != FOOTER_SIZE or blob_size < FOOTER_SIZE:
        raise FormatError("blob too short for a peerpull footer: not a seekable layer")
    magic, size = SKIPPABLE_HEADER.unpack_from(tail)
    if magic != FOOTER_FRAME_MAGIC or size != _FOOTER_PAYLOAD.size:
        raise FormatError("no peerpull footer at the end of the blob: not a seekable layer")
    fmagic, version, _flags, _r1, toc_offset, toc_length, toc_uncompressed, _r2 = _FOOTER_PAYLOAD.unpack_from(
        tail, SKIPPABLE_HEADER.size
    )
    if fmagic != FOOTER_MAGIC:
        raise FormatError("footer magic mismatch: not a seekable layer")
    if version != FORMAT_VERSION:
        raise FormatError(f"seekable layer format version {version} is not supported (this is {FORMAT_VERSION})")
    if toc_length <= SKIPPABLE_HEADER.size or toc_offset + toc_length + FOOTER_SIZE != blob_size:
        raise FormatError("footer locates the TOC outside the blob")
    if toc_uncompressed > MAX_TOC_BYTES:
        raise FormatError(f"TOC claims {toc_uncompressed} bytes, above the {MAX_TOC_BYTES} limit")
    return Footer(toc_offset, toc_length, toc_uncompressed)


# ---- TOC ----------------------------------------------------------------------------------

def _entry_to_wire(e: TocEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"path": e.path, "type": e.type, "mode": e.mode, "uid": e.uid, "gid": e.gid}
    optional = {
        "uname": e.uname, "gname": e.gname, "mtime": e.mtime, "mtime_nsec": e.mtime_nsec, "size": e.size,
        "link": e.link, "devmajor": e.devmajor, "devminor": e.devminor, "xattrs": e.xattrs,
    }
    out.update({k: v for k, v in optional.items() if v})
    if e.chunks:
        out["chunks"] = [list(c) for c in e.chunks]
    return out


def encode_toc(toc: Toc, level: int = DEFAULT_COMPRESSION_LEVEL) -> tuple[bytes, int]:
    """The TOC skippable frame (header + zstd-compressed msgpack) and the msgpack length."""
    wire = {"version": FORMAT_VERSION, "chunk_size": toc.chunk_size, "entries": [_entry_to_wire(e) for e in toc.entries]}
    packed = msgpack.packb(wire, use_bin_type=True)
    compressed = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(packed)
    return SKIPPABLE_HEADER.pack(TOC_FRAME_MAGIC, len(compressed)) + compressed, len(packed)


def _want(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    # bool is an int subclass; a TOC never has booleans where numbers belong
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FormatError(f"TOC: {what} has the wrong type ({type(value).__name__})")
    return value


def _uint(value: Any, what: str, limit: int = 1 << 63) -> int:
    v = _want(value, int, what)
    if not 0 <= v < limit:
        raise FormatError(f"TOC: {what} out of range ({v})")
    return v


def _decode_entry(raw: Any, chunk_size: int, data_end: int) -> TocEntry:
    raw = _want(raw, dict, "entry")
    path = _want(raw.get("path"), str, "path")
    if normalize_path(path) != path:
        raise FormatError(f"TOC: path not normalized: {path[:200]!r}")
    etype = _want(raw.get("type"), str, "type")
    if etype not in ENTRY_TYPES:
        raise FormatError(f"TOC: unknown entry type {etype[:40]!r}")
    xattrs = _want(raw.get("xattrs", {}), dict, "xattrs")
    for k, v in xattrs.items():
        _want(k, str, "xattr name")
        _want(v, bytes, "xattr value")
    entry = TocEntry(
        path=path, type=etype, mode=_uint(raw.get("mode", 0), "mode", 1 << 16),
        uid=_uint(raw.get("uid", 0), "uid", 1 << 32), gid=_uint(raw.get("gid", 0), "gid", 1 << 32),
        uname=_want(raw.get("uname", ""), str, "uname"), gname=_want(raw.get("gname", ""), str, "gname"),
        mtime=_want(raw.get("mtime", 0), int, "mtime"), mtime_nsec=_uint(raw.get("mtime_nsec", 0), "mtime_nsec", 10**9),
        size=_uint(raw.get("size", 0), "size"), link=_want(raw.get("link", ""), str, "link"),
        devmajor=_uint(raw.get("devmajor", 0), "devmajor", 1 << 32),
        devminor=_uint(raw.get("devminor", 0), "devminor", 1 << 32), xattrs=xattrs,
    )
    chunks_raw = _want(raw.get("chunks", []), list, "chunks")
    if etype != FILE and chunks_raw:
        raise FormatError(f"TOC: {etype} entry {path[:200]!r} has chunks")
    expected_offset = 0
    for c in chunks_raw:
        c = _want(c, list, "chunk")
        if len(c) != 5:
            raise FormatError("TOC: a chunk has 5 fields")
        chunk = Chunk(
            _uint(c[0], "chunk file offset"), _uint(c[1], "chunk length", chunk_size + 1),
            _uint(c[2], "chunk blob offset"), _uint(c[3], "chunk compressed length"), _want(c[4], bytes, "chunk digest"),
        )
        if chunk.file_offset != expected_offset or chunk.length == 0 or len(chunk.digest) != 32:
            raise FormatError(f"TOC: chunks of {path[:200]!r} do not tile the file")
        if chunk.compressed_length == 0 or chunk.blob_offset + chunk.compressed_length > data_end:
            raise FormatError(f"TOC: a chunk of {path[:200]!r} lies outside the layer data")
        expected_offset += chunk.length
        entry.chunks.append(chunk)
    if etype == FILE and expected_offset != entry.size:
        raise FormatError(f"TOC: chunks of {path[:200]!r} cover {expected_offset} of {entry.size} bytes")
    return entry


def decode_toc(frame: bytes, footer: Footer) -> Toc:
    """Parse and validate a TOC skippable frame located by `footer`."""
    if len(frame) != footer.toc_length:
        raise FormatError("TOC frame has the wrong length")
    magic, size = SKIPPABLE_HEADER.unpack_from(frame)
    if magic != TOC_FRAME_MAGIC or size != len(frame) - SKIPPABLE_HEADER.size:
        raise FormatError("TOC frame header mismatch")
    try:
        packed = zstandard.ZstdDecompressor().decompress(
            frame[SKIPPABLE_HEADER.size:], max_output_size=footer.toc_uncompressed
        )
    except zstandard.ZstdError as exc:
        raise FormatError(f"TOC does not decompress: {exc}") from None
    if len(packed) != footer.toc_uncompressed:
        raise FormatError("TOC size differs from the footer's")
    try:
        wire = msgpack.unpackb(packed, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise FormatError(f"TOC is not valid msgpack: {exc}") from None
    wire = _want(wire, dict, "TOC")
    if wire.get("version") != FORMAT_VERSION:
        raise FormatError(f"TOC version {wire.get('version')!r} is not supported")
    chunk_size = _uint(wire.get("chunk_size"), "chunk_size", MAX_CHUNK_SIZE + 1)
    if chunk_size < MIN_CHUNK_SIZE:
        raise FormatError(f"TOC chunk size {chunk_size} below the minimum")
    entries = [_decode_entry(e, chunk_size, footer.toc_offset) for e in _want(wire.get("entries"), list, "entries")]
    return Toc(chunk_size=chunk_size, entries=entries)
