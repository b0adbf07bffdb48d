"""The seekable layer format: round trip, random access, determinism, hostile input."""

from __future__ import annotations

import asyncio
import gzip
import io
import random
import tarfile

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converter.conversion.layer_writer import write_seekable_layer
from converter.conversion.streams import open_decompressed
from converter.format import toc as fmt
from converter.format.digest import sha256_digest
from converter.format.errors import DigestMismatchError, FormatError, PeerpullError, UnsupportedError
from converter.format.layer_reader import FileRangeReader, TocLocation, decompress_chunk, read_chunk, read_toc

CHUNK = 16 * 1024


def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None, **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
    tf.addfile(info, io.BytesIO(data) if data is not None else None)


def make_tar(tar_format: int) -> bytes:
    rnd = random.Random(tar_format)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tf:
        _add(tf, "./", type=tarfile.DIRTYPE, mode=0o755)
        _add(tf, "dir", type=tarfile.DIRTYPE, mode=0o1777)
        for size in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7):
            _add(tf, f"dir/size-{size}", rnd.randbytes(size), mode=0o644)
        _add(tf, "dir/text", b"hello peerpull\n" * 5000, mode=0o4755, uid=1000, gid=65534, uname="u", gname="g")
        _add(tf, "a/" + "long-directory-name/" * 8 + "file-with-a-long-name.bin", rnd.randbytes(300))
        _add(tf, "ünïcødé/日本語 ✓.txt", b"unicode content")
        _add(tf, "sym-rel", type=tarfile.SYMTYPE, linkname="dir/text")
        _add(tf, "sym-long", type=tarfile.SYMTYPE, linkname="/" + "target/" * 30)
        _add(tf, "other/hard", type=tarfile.LNKTYPE, linkname="dir/text")
        _add(tf, "dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        _add(tf, "dev/loop0", type=tarfile.BLKTYPE, devmajor=7, devminor=0)
        _add(tf, "run/fifo", type=tarfile.FIFOTYPE)
        _add(tf, "gone/.wh.file", b"")
        _add(tf, "opaque/.wh..wh..opq", b"")
        if tar_format == tarfile.PAX_FORMAT:
            _add(tf, "xattr", b"x", pax_headers={"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.capability": "c"})
            _add(tf, "bigid", b"y", uid=3_000_000, gid=3_000_001)
    return buf.getvalue()


def convert(tar: bytes, **kwargs: object) -> tuple[bytes, object]:
    out = io.BytesIO()
    result = write_seekable_layer(io.BytesIO(tar), out, chunk_size=CHUNK, **kwargs)  # type: ignore[arg-type]
    return out.getvalue(), result


def load_toc(tmp_path, blob: bytes) -> tuple[FileRangeReader, fmt.Footer, fmt.Toc]:
    path = tmp_path / "layer.blob"
    path.write_bytes(blob)
    reader = FileRangeReader(path)
    footer, toc = asyncio.run(read_toc(reader))
    return reader, footer, toc


FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


@pytest.mark.parametrize("tar_format", FORMATS, ids=["ustar", "gnu", "pax"])
def test_round_trip_is_the_same_tar_byte_for_byte(tar_format: int) -> None:
    tar = make_tar(tar_format) if tar_format != tarfile.USTAR_FORMAT else _ustar_tar()
    blob, result = convert(tar)
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    assert plain == tar
    assert result.diff_id == sha256_digest(tar)
    assert result.digest == sha256_digest(blob)


def _ustar_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "d", type=tarfile.DIRTYPE)
        _add(tf, "d/" + "p" * 120 + "/f", b"prefix field", mode=0o600)  # needs the ustar prefix field
        _add(tf, "d/f2", bytes(CHUNK * 2))
    return buf.getvalue()


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_toc_lists_every_entry_with_its_metadata(tmp_path, tar_format: int) -> None:
    tar = make_tar(tar_format)
    blob, _ = convert(tar)
    _, _, toc = load_toc(tmp_path, blob)
    members = tarfile.open(fileobj=io.BytesIO(tar)).getmembers()
    assert len(toc.entries) == len(members)
    for entry, member in zip(toc.entries, members):
        assert entry.path == fmt.normalize_path(member.name) or entry.type in (fmt.WHITEOUT, fmt.OPAQUE)
        assert (entry.mode, entry.uid, entry.gid, entry.mtime) == (member.mode, member.uid, member.gid, member.mtime)
        assert (entry.uname, entry.gname) == (member.uname, member.gname)
        if member.isreg() and entry.type == fmt.FILE:
            assert entry.size == member.size
        if member.issym():
            assert (entry.type, entry.link) == (fmt.SYMLINK, member.linkname)
        if member.islnk():
            assert (entry.type, entry.link) == (fmt.HARDLINK, member.linkname)
        if member.ischr() or member.isblk():
            assert (entry.devmajor, entry.devminor) == (member.devmajor, member.devminor)
        xattrs = {k[len("SCHILY.xattr."):]: v.encode() for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        assert entry.xattrs == xattrs
    by_path = {e.path: e for e in toc.entries}
    assert by_path["gone/file"].type == fmt.WHITEOUT
    assert by_path["opaque"].type == fmt.OPAQUE
    assert by_path["dev/null"].type == fmt.CHAR and by_path["run/fifo"].type == fmt.FIFO
    assert by_path["."].type == fmt.DIR


def test_every_chunk_read_alone_matches_the_source(tmp_path) -> None:
    tar = make_tar(tarfile.PAX_FORMAT)
    blob, result = convert(tar)
    reader, _, toc = load_toc(tmp_path, blob)
    source = {m.name: tarfile.open(fileobj=io.BytesIO(tar)).extractfile(m.name) for m in tarfile.open(fileobj=io.BytesIO(tar)) if m.isreg()}
    checked = 0
    for entry in toc.entries:
        if entry.type != fmt.FILE or not entry.chunks:
            continue
        name = next(n for n in source if fmt.normalize_path(n) == entry.path)
        content = tarfile.open(fileobj=io.BytesIO(tar)).extractfile(name).read()
        for chunk in entry.chunks:
            assert chunk.length <= CHUNK
            data = asyncio.run(read_chunk(reader, chunk))
            assert data == content[chunk.file_offset:chunk.file_offset + chunk.length]
            checked += 1
    assert checked == result.chunks == toc.chunk_count
    size3 = next(e for e in toc.entries if e.path == f"dir/size-{3 * CHUNK + 7}")
    assert [c.length for c in size3.chunks] == [CHUNK, CHUNK, CHUNK, 7]


def test_conversion_is_deterministic_whatever_the_worker_count() -> None:
    tar = make_tar(tarfile.PAX_FORMAT)
    assert convert(tar, workers=1)[0] == convert(tar, workers=2)[0] == convert(tar, workers=4)[0]


def test_identical_content_gives_identical_chunk_ids(tmp_path) -> None:
    buf = io.BytesIO()
    data = random.Random(5).randbytes(CHUNK * 2)
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _add(tf, "one", data)
        _add(tf, "two", data)
    _, _, toc = load_toc(tmp_path, convert(buf.getvalue())[0])
    assert [c.digest for c in toc.entries[0].chunks] == [c.digest for c in toc.entries[1].chunks]


def test_annotation_location_is_checked(tmp_path) -> None:
    blob, result = convert(make_tar(tarfile.PAX_FORMAT))
    path = tmp_path / "b"
    path.write_bytes(blob)
    good = TocLocation(result.toc_digest, result.toc_offset, result.toc_length)
    asyncio.run(read_toc(FileRangeReader(path), good))
    with pytest.raises(DigestMismatchError):
        asyncio.run(read_toc(FileRangeReader(path), TocLocation("sha256:" + "0" * 64, result.toc_offset, result.toc_length)))
    with pytest.raises(FormatError):
        asyncio.run(read_toc(FileRangeReader(path), TocLocation(result.toc_digest, result.toc_offset + 1, result.toc_length)))


def test_a_corrupted_chunk_is_never_returned(tmp_path) -> None:
    blob, _ = convert(make_tar(tarfile.PAX_FORMAT))
    _, _, toc = load_toc(tmp_path, blob)
    chunk = next(e for e in toc.entries if e.path == "dir/text").chunks[0]
    frame = bytearray(blob[chunk.blob_offset:chunk.blob_offset + chunk.compressed_length])
    frame[len(frame) // 2] ^= 0xFF
    with pytest.raises(FormatError):
        decompress_chunk(bytes(frame), chunk)
    # a well-formed frame of other bytes: caught by the digest
    other = zstandard.ZstdCompressor().compress(b"z" * chunk.length)
    with pytest.raises(DigestMismatchError):
        decompress_chunk(other, chunk._replace(compressed_length=len(other)))


def test_truncated_and_corrupt_sources_are_format_errors() -> None:
    tar = make_tar(tarfile.PAX_FORMAT)
    with pytest.raises(FormatError):
        convert(tar[: len(tar) // 2 + 100])
    gz = gzip.compress(tar, mtime=0)
    for bad in (gz[: len(gz) // 2], gz[:100] + bytes(50) + gz[150:]):
        with pytest.raises(FormatError):
            write_seekable_layer(open_decompressed(io.BytesIO(bad), "gzip", "layer"), io.BytesIO(), chunk_size=CHUNK)
    header = bytearray(tar)
    header[148:156] = b"0000000\0"  # wrong checksum
    with pytest.raises(FormatError, match="checksum"):
        convert(bytes(header))


def test_multi_member_gzip_and_zstd_sources_are_read_whole() -> None:
    tar = make_tar(tarfile.GNU_FORMAT)
    half = len(tar) // 2
    gz = gzip.compress(tar[:half], mtime=0) + gzip.compress(tar[half:], mtime=0)
    assert open_decompressed(io.BytesIO(gz), "gzip", "l").read(-1) == tar
    zst = zstandard.ZstdCompressor().compress(tar[:half]) + zstandard.ZstdCompressor().compress(tar[half:])
    assert open_decompressed(io.BytesIO(zst), "zstd", "l").read(len(tar) + 10) == tar


def test_escaping_paths_and_sparse_files_are_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _add(tf, "../escape", b"x")
    with pytest.raises(FormatError, match="escapes"):
        convert(buf.getvalue())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, "sparse", b"", type=tarfile.GNUTYPE_SPARSE)
    with pytest.raises(UnsupportedError, match="sparse"):
        convert(buf.getvalue())


# ---- hostile footers and TOCs: only FormatError may come out ------------------------------

_VALID_BLOB, _VALID_RESULT = convert(make_tar(tarfile.PAX_FORMAT))
_FOOTER = fmt.decode_footer(_VALID_BLOB[-fmt.FOOTER_SIZE:], len(_VALID_BLOB))
_TOC_FRAME = _VALID_BLOB[_FOOTER.toc_offset:_FOOTER.toc_offset + _FOOTER.toc_length]


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=fmt.FOOTER_SIZE, max_size=fmt.FOOTER_SIZE), st.integers(0, 1 << 40))
def test_fuzz_footer(tail: bytes, size: int) -> None:
    try:
        fmt.decode_footer(tail, size)
    except FormatError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_toc_frame_mutations(data: st.DataObject) -> None:
    frame = bytearray(_TOC_FRAME)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    try:
        fmt.decode_toc(bytes(frame), _FOOTER)
    except FormatError:
        pass


_wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=30,
)
_entry_like = st.fixed_dictionaries(
    {"path": st.sampled_from(["a", "b/c", ".", "../x", "/abs", ""]) | st.text(max_size=8),
     "type": st.sampled_from(sorted(fmt.ENTRY_TYPES)) | st.text(max_size=5)},
    optional={k: _wire_values for k in ("mode", "uid", "gid", "size", "link", "xattrs", "mtime", "devmajor")}
    | {"chunks": st.lists(st.lists(st.integers(-2, 1 << 20) | st.binary(min_size=32, max_size=32), min_size=4, max_size=6), max_size=4)},
)


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({"version": st.sampled_from([1, 2]) | _wire_values,
                              "chunk_size": st.sampled_from([CHUNK, 0, 1 << 30]) | _wire_values,
                              "entries": st.lists(_entry_like, max_size=5) | _wire_values}))
def test_fuzz_toc_structure(wire: dict) -> None:
    packed = msgpack.packb(wire, use_bin_type=True)
    compressed = zstandard.ZstdCompressor().compress(packed)
    frame = fmt.SKIPPABLE_HEADER.pack(fmt.TOC_FRAME_MAGIC, len(compressed)) + compressed
    version = wire["version"] if wire["version"] in fmt.SUPPORTED_VERSIONS else 1  # reach the entries
    footer = fmt.Footer(toc_offset=1 << 30, toc_length=len(frame), toc_uncompressed=len(packed), version=version)
    try:
        toc = fmt.decode_toc(frame, footer)
    except FormatError:
        return
    for entry in toc.entries:  # whatever was accepted obeys the invariants
        assert fmt.normalize_path(entry.path) == entry.path
        assert sum(c.length for c in entry.chunks) == (entry.size if entry.type == fmt.FILE else 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4096), st.integers(0, 255))
def test_fuzz_blob_tail_through_the_reader(cut: int, byte: int) -> None:
    """Flipping a tail byte or truncating the blob: read_toc raises PeerpullError or parses."""
    blob = bytearray(_VALID_BLOB)
    blob[-min(cut, len(blob))] = byte

    class Reader:
        size = len(blob)

        async def read_range(self, offset: int, length: int) -> bytes:
            return bytes(blob[offset:offset + length])

    try:
        asyncio.run(read_toc(Reader()))  # type: ignore[arg-type]
    except PeerpullError:
        pass


def test_a_frame_announcing_a_huge_size_is_refused_before_allocation() -> None:
    """A hostile peer or registry could send a frame whose header asks for terabytes."""
    import io

    import zstandard

    from converter.format.errors import FormatError
    from converter.format.layer_reader import decompress_chunk

    buffer = io.BytesIO()
    writer = zstandard.ZstdCompressor(write_content_size=True).stream_writer(buffer, size=1 << 40, closefd=False)
    writer.write(b"x" * 100)
    writer.flush(zstandard.FLUSH_BLOCK)
    frame = buffer.getvalue()
    assert zstandard.frame_content_size(frame) == 1 << 40
    chunk = fmt.Chunk(0, 100, 0, len(frame), bytes(32))
    with pytest.raises(FormatError, match="announces"):
        decompress_chunk(frame, chunk)


def test_a_footer_or_annotation_placing_a_huge_toc_is_refused_before_reading() -> None:
    from converter.format.layer_reader import location_from_annotations

    toc_length = fmt.MAX_TOC_BYTES + 1
    blob_size = 1 << 40
    footer = fmt.encode_footer(fmt.Footer(blob_size - toc_length - fmt.FOOTER_SIZE, toc_length, 1000))
    with pytest.raises(FormatError, match="TOC frame claims"):
        fmt.decode_footer(footer, blob_size)
    base = {fmt.ANNOTATION_TOC_DIGEST: "sha256:" + "0" * 64, fmt.ANNOTATION_TOC_OFFSET: "10"}
    for length in (str(fmt.MAX_TOC_BYTES + 1), "0", "-5"):
        with pytest.raises(FormatError, match="TOC"):
            location_from_annotations({**base, fmt.ANNOTATION_TOC_LENGTH: length})
    with pytest.raises(FormatError, match="TOC"):
        location_from_annotations({**base, fmt.ANNOTATION_TOC_OFFSET: "-1", fmt.ANNOTATION_TOC_LENGTH: "100"})
