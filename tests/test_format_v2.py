"""Format version 2: small files packed into shared frames, read back piece by piece; version 1
still written on request and read; hostile version 2 TOCs refused."""

from __future__ import annotations

import asyncio
import io
import random
import tarfile
from typing import cast

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from converter.conversion.layer_writer import write_seekable_layer
from converter.format import toc as fmt
from converter.format.digest import sha256_digest
from converter.format.errors import FormatError
from converter.format.layer_reader import decompress_chunk, read_chunk
from peer.chunk import ChunkRef
from peer.fetcher import ChunkFetcher
from peer.warm import layer_refs
from snapshotter.fs.file_reader import FileReader, LayerSource
from tests.test_format import CHUNK, FORMATS, _add, load_toc, make_tar

SMALL = fmt.pack_threshold(CHUNK)


def _many_small_files(seed: int = 3, count: int = 120) -> bytes:
    """Files around the packing threshold and the chunk size, with directories and links between."""
    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "pkg", type=tarfile.DIRTYPE, mode=0o755)
        for i in range(count):
            size = rnd.choice([0, 1, 511, 512, 513, SMALL - 1, SMALL, SMALL + 1, CHUNK - 1, CHUNK, 2 * CHUNK + 3,
                               rnd.randint(0, SMALL), rnd.randint(0, 3 * CHUNK)])
            _add(tf, f"pkg/mod{i:03d}.py", rnd.randbytes(size), mode=0o644)
            if i % 17 == 0:
                _add(tf, f"pkg/link{i}", type=tarfile.SYMTYPE, linkname=f"mod{i:03d}.py")
    return buf.getvalue()


def _contents(tar: bytes) -> dict[str, bytes]:
    src = tarfile.open(fileobj=io.BytesIO(tar))
    return {fmt.normalize_path(m.name): src.extractfile(m).read() for m in src.getmembers() if m.isreg()}  # type: ignore[union-attr]


def _convert(tar: bytes, **kwargs: object) -> tuple[bytes, object]:
    out = io.BytesIO()
    result = write_seekable_layer(io.BytesIO(tar), out, chunk_size=CHUNK, **kwargs)  # type: ignore[arg-type]
    return out.getvalue(), result


@pytest.mark.parametrize("tar_format", FORMATS, ids=["ustar", "gnu", "pax"])
def test_v2_is_the_same_tar_and_every_file_reads_through_the_toc(tmp_path, tar_format: int) -> None:
    tar = make_tar(tar_format) if tar_format != tarfile.USTAR_FORMAT else _many_small_files()
    blob, result = _convert(tar)
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read() == tar
    assert result.diff_id == sha256_digest(tar) and result.format_version == 2  # type: ignore[attr-defined]
    reader, footer, toc = load_toc(tmp_path, blob)
    assert footer.version == toc.version == 2
    contents = _contents(tar)
    for entry in toc.entries:
        if entry.type == fmt.FILE:
            got = b"".join(asyncio.run(read_chunk(reader, c)) for c in entry.chunks)
            assert got == contents[entry.path], entry.path


def test_small_files_share_frames_and_large_ones_keep_chunk_aligned_frames(tmp_path) -> None:
    tar = _many_small_files()
    blob, result = _convert(tar)
    _, _, toc = load_toc(tmp_path, blob)
    frames: dict[int, fmt.Chunk] = {}
    for entry in toc.entries:
        for c in entry.chunks:
            assert c.frame_offset + c.length <= c.frame_length <= CHUNK  # a piece never leaves its frame
            seen = frames.setdefault(c.blob_offset, c)
            assert (seen.digest, seen.compressed_length, seen.frame_length) == (c.digest, c.compressed_length,
                                                                                c.frame_length)
        if entry.type != fmt.FILE or not entry.size:
            continue
        if entry.size < SMALL:
            assert len(entry.chunks) == 1  # whole, in one frame
        else:
            assert [c.file_offset for c in entry.chunks] == list(range(0, entry.size, CHUNK))
            assert all(c.frame_offset == 0 and c.frame_length == c.length for c in entry.chunks)
    assert toc.frame_count == len(frames) == result.frames < result.chunks  # type: ignore[attr-defined]
    # the digest is of the whole frame, which decompresses from exactly its place in the blob
    for c in frames.values():
        data = decompress_chunk(blob[c.blob_offset:c.blob_offset + c.compressed_length], c)
        assert len(data) == c.frame_length
    v1_blob, v1 = _convert(tar, format_version=1)
    assert result.frames < v1.frames == v1.chunks  # type: ignore[attr-defined]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2 * CHUNK + 5), min_size=1, max_size=40), st.integers(0, 3))
def test_packing_round_trip_for_any_sizes(sizes: list[int], seed: int) -> None:
    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i, size in enumerate(sizes):
            _add(tf, f"f{i}" + "n" * rnd.randint(0, 150), rnd.randbytes(size))
    tar = buf.getvalue()
    blob, result = _convert(tar)
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read() == tar
    footer = fmt.decode_footer(blob[-fmt.FOOTER_SIZE:], len(blob))
    toc = fmt.decode_toc(blob[footer.toc_offset:footer.toc_offset + footer.toc_length], footer)
    contents = _contents(tar)
    for entry in toc.entries:
        pieces = []
        for c in entry.chunks:
            frame = decompress_chunk(blob[c.blob_offset:c.blob_offset + c.compressed_length], c)
            pieces.append(frame[c.frame_offset:c.frame_offset + c.length])
        assert b"".join(pieces) == contents[entry.path]


def test_v2_is_deterministic_whatever_the_worker_count() -> None:
    tar = _many_small_files()
    assert _convert(tar, workers=1)[0] == _convert(tar, workers=3)[0]


def test_v1_is_still_written_on_request_and_reads(tmp_path) -> None:
    tar = make_tar(tarfile.PAX_FORMAT)
    blob, result = _convert(tar, format_version=1)
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read() == tar
    reader, footer, toc = load_toc(tmp_path, blob)
    assert footer.version == toc.version == result.format_version == 1  # type: ignore[attr-defined]
    assert fmt.decode_toc(blob[footer.toc_offset:footer.toc_offset + footer.toc_length], footer).version == 1
    contents = _contents(tar)
    for entry in toc.entries:
        for c in entry.chunks:  # every frame holds exactly one piece of one file
            assert (c.frame_offset, c.frame_length) == (0, c.length)
        if entry.type == fmt.FILE:
            assert b"".join(asyncio.run(read_chunk(reader, c)) for c in entry.chunks) == contents[entry.path]
    assert len({c.blob_offset for e in toc.entries for c in e.chunks}) == result.chunks  # type: ignore[attr-defined]
    with pytest.raises(FormatError, match="format version"):
        _convert(tar, format_version=3)


def test_a_chunk_ref_is_the_whole_frame_and_a_layer_lists_each_frame_once(tmp_path) -> None:
    _, _, toc = load_toc(tmp_path, _convert(_many_small_files())[0])
    blob = "sha256:" + "ab" * 32
    packed = next(c for e in toc.entries for c in e.chunks if c.frame_offset > 0)
    ref = ChunkRef.from_chunk(packed, "r/x", blob)
    assert ref.length == packed.frame_length and ChunkRef.unpack(ref.pack()) == ref
    assert ref.as_chunk() == (0, packed.frame_length, packed.blob_offset, packed.compressed_length, packed.digest, 0,
                              packed.frame_length)
    refs = layer_refs(toc, "r/x", blob)
    offsets = [r.blob_offset for r in refs]
    assert offsets == sorted(set(offsets)) and len(refs) == toc.frame_count
    assert [r.next_offset for r in refs] == [*offsets[1:], 0]
    source = LayerSource.from_toc("r/x", blob, toc)
    assert [c.blob_offset for c in source.chunks] == offsets


class BlobFetcher:
    """The fetcher's contract over a local blob: whole frames, verified (counts what it loads)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.gets: list[int] = []

    async def get(self, ref: ChunkRef) -> bytes:
        self.gets.append(ref.blob_offset)
        frame = self.blob[ref.blob_offset:ref.blob_offset + ref.compressed_length]
        return decompress_chunk(frame, ref.as_chunk())

    async def fetch(self, ref: ChunkRef, use_peers: bool, background: bool = False) -> object:
        return await self.get(ref)

    def cached(self, digest: str) -> bool:  # nothing is on disk: every read goes through get
        return False


async def test_file_reader_slices_pieces_out_of_shared_frames() -> None:
    tar = _many_small_files(seed=9)
    blob, _ = _convert(tar)
    footer = fmt.decode_footer(blob[-fmt.FOOTER_SIZE:], len(blob))
    toc = fmt.decode_toc(blob[footer.toc_offset:footer.toc_offset + footer.toc_length], footer)
    fetcher = BlobFetcher(blob)
    reader = FileReader(cast(ChunkFetcher, fetcher), 64 << 20, "none", 2)
    source = LayerSource.from_toc("r/x", "sha256:" + "ab" * 32, toc)
    contents = _contents(tar)
    rnd = random.Random(1)
    for ino, entry in enumerate(e for e in toc.entries if e.type == fmt.FILE):
        data = contents[entry.path]
        assert await reader.read(source, ino, entry.chunks, entry.size, 0, entry.size + 10) == data
        for _ in range(3):  # ranges inside one piece and straddling frames
            off = rnd.randint(0, max(0, entry.size - 1))
            n = rnd.randint(1, 2 * CHUNK)
            assert await reader.read(source, ino, entry.chunks, entry.size, off, n) == data[off:off + n]
    # each frame loaded once however many files it holds: the memory cache keys frames by digest
    assert sorted(fetcher.gets) == sorted(set(fetcher.gets)) and len(fetcher.gets) <= toc.frame_count
    await reader.close()


# ---- hostile version 2 TOCs ---------------------------------------------------------------

_DIGEST = bytes(range(32))


def _v2_frame(wire: dict) -> tuple[bytes, fmt.Footer]:
    packed = msgpack.packb(wire, use_bin_type=True)
    compressed = zstandard.ZstdCompressor().compress(packed)
    frame = fmt.SKIPPABLE_HEADER.pack(fmt.TOC_FRAME_MAGIC, len(compressed)) + compressed
    return frame, fmt.Footer(toc_offset=1 << 20, toc_length=len(frame), toc_uncompressed=len(packed), version=2)


def _wire(frames: list, chunks: list, size: int = 100, **extra: object) -> dict:
    entry = {"path": "f", "type": "file", "size": size, "chunks": chunks}
    return {"version": 2, "chunk_size": CHUNK, "frames": frames, "entries": [entry], **extra}


def test_a_valid_v2_toc_shares_frames_between_files() -> None:
    wire = _wire([[0, 50, 300, _DIGEST]], [[0, 100, 0, 200]])
    wire["entries"].append({"path": "g", "type": "file", "size": 200, "chunks": [[0, 200, 0, 0]]})
    toc = fmt.decode_toc(*_v2_frame(wire))
    f, g = (e.chunks[0] for e in toc.entries)
    assert (f.frame_offset, g.frame_offset, f.frame_length, f.blob_offset, f.digest) == (200, 0, 300, 0, _DIGEST)
    assert toc.frame_count == 1 and toc.chunk_count == 2


@pytest.mark.parametrize("wire, match", [
    (_wire([[0, 50, 150, _DIGEST]], [[0, 100, 0, 60]]), "overruns its frame"),
    (_wire([[0, 50, CHUNK + 1, _DIGEST]], [[0, 100, 0, 0]]), "bad size"),
    (_wire([[0, 50, 100, _DIGEST]], [[0, 100, 1, 0]]), "names frame 1"),
    (_wire([[0, 50, 100, _DIGEST]], [[0, 100, -1, 0]]), "names frame"),
    (_wire([[0, 50, 100, _DIGEST]], [[0, 100, 0, -1]]), "overruns"),
    (_wire([[0, 50, 100, _DIGEST], [40, 50, 100, _DIGEST]], [[0, 100, 0, 0]]), "overlaps"),
    (_wire([[60, 50, 100, _DIGEST], [0, 50, 100, _DIGEST]], [[0, 100, 0, 0]]), "overlaps"),
    (_wire([[(1 << 20) - 10, 50, 100, _DIGEST]], [[0, 100, 0, 0]]), "outside"),
    (_wire([[0, 0, 100, _DIGEST]], [[0, 100, 0, 0]]), "bad size"),
    (_wire([[0, 50, 100, _DIGEST[:31]]], [[0, 100, 0, 0]]), "digest"),
    (_wire([[0, 50, 100, _DIGEST]], [[0, 60, 0, 0], [50, 40, 0, 60]]), "tile"),
    (_wire([[0, 50, 100, _DIGEST]], [[0, 60, 0, 0]]), "cover 60 of 100"),
    (_wire([[0, 50, 100, _DIGEST]], [[0, 100, 0, 0, 0]]), "4 fields"),
    (_wire([[0, 50, 100, _DIGEST]], [[0, 100, 0, True]]), "wrong type"),
    (_wire([[0, 50, 100, "x" * 32]], [[0, 100, 0, 0]]), "wrong type"),
    (_wire([[0, 50, 100]], [[0, 100, 0, 0]]), "4 fields"),
    ({"version": 2, "chunk_size": CHUNK, "entries": []}, "frames"),
    (_wire([[0, 50, 100, _DIGEST]], [[0, 100, 0, 0]], version=1), "differs from the footer"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_hostile_v2_tocs_are_refused(wire: dict, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        fmt.decode_toc(*_v2_frame(wire))


def test_footer_versions_outside_1_and_2_are_refused() -> None:
    good = fmt.encode_footer(fmt.Footer(0, 100, 10, version=2))
    assert fmt.decode_footer(good, 156).version == 2
    assert fmt.decode_footer(fmt.encode_footer(fmt.Footer(0, 100, 10, version=1)), 156).version == 1
    bad = bytearray(good)
    bad[16:18] = (3).to_bytes(2, "little")
    with pytest.raises(FormatError, match="version 3 is not supported"):
        fmt.decode_footer(bytes(bad), 156)


_ints = st.integers(-2, 1 << 21) | st.booleans() | st.binary(max_size=33) | st.none()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_ints, min_size=3, max_size=5), max_size=4),
       st.lists(st.lists(st.lists(_ints, min_size=3, max_size=5), max_size=4), max_size=3),
       st.lists(st.integers(0, 1 << 21), min_size=3, max_size=3))
def test_fuzz_v2_toc(frames: list, chunk_lists: list, sizes: list) -> None:
    frames = [[*f[:3], _DIGEST] if len(f) == 4 else f for f in frames]
    entries = [{"path": f"p{i}", "type": "file", "size": sizes[i], "chunks": c} for i, c in enumerate(chunk_lists)]
    try:
        toc = fmt.decode_toc(*_v2_frame({"version": 2, "chunk_size": CHUNK, "frames": frames, "entries": entries}))
    except FormatError:
        return
    for entry in toc.entries:  # whatever was accepted obeys the reader rules
        assert sum(c.length for c in entry.chunks) == entry.size
        for c in entry.chunks:
            assert 0 <= c.frame_offset and c.frame_offset + c.length <= c.frame_length <= CHUNK
            assert 0 <= c.blob_offset and c.blob_offset + c.compressed_length <= 1 << 20


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab./\0", max_size=12))
def test_the_cheap_path_check_never_lets_an_unnormalized_path_through(path: str) -> None:
    if fmt._plainly_normalized(path):
        assert fmt.normalize_path(path) == path
