"""What the simulated nodes start: a working set of frames in first-read order.

From a real converted image (an OCI layout whose layers are peerpull layers: their TOCs are read
with the converter's own reader) and, when given, a real startup profile (its reads in order); or
a synthetic TOC and profile with this project's frame sizes (1 MiB chunks of large files, packed
frames of small ones) when no real image is at hand. `Feed.source` says which was used.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from converter.format.layer_reader import FileRangeReader, read_toc
from peer.chunk import ChunkRef
from peer.warm import layer_refs

REPOSITORY = "registry.sim/app"  # the repository every simulated ref names
CHUNK = 1 << 20


@dataclass(frozen=True)
class Feed:
    refs: tuple[ChunkRef, ...]  # the working set, first-read order, distinct frames
    source: str  # "synthetic …" or the layout and profile read
    payloads: dict[str, bytes] | None = None  # digest → real frame bytes (small feeds), else tokens

    @property
    def bytes(self) -> int:
        return sum(r.compressed_length for r in self.refs)

    def frame(self, ref: ChunkRef) -> bytes:
        """What the origin sends for `ref`: its real bytes, or a token the receiver checks."""
        if self.payloads is not None:
            return self.payloads[ref.digest]
        return ref.digest.encode()

    def valid(self, ref: ChunkRef, frame: bytes) -> bool:
        """Real bytes: their sha256 is the digest. Tokens: the frame starts with its digest (what the
        registry sends is padded to the frame's size, what peers send is the token alone)."""
        if self.payloads is not None:
            return "sha256:" + hashlib.sha256(frame).hexdigest() == ref.digest
        token = ref.digest.encode()
        return frame[:len(token)] == token and len(frame) in (len(token), ref.compressed_length)

    def kept(self, ref: ChunkRef, frame: bytes) -> bytes:
        """What a node keeps of a verified frame: tokens only, so 1,000 caches fit in memory."""
        return frame if self.payloads is not None else ref.digest.encode()

    def blob_range(self, blob: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of a layer blob as the registry serves them: the working
        set's frames in place (zeros elsewhere; a Range never covers another frame's bytes)."""
        data = bytearray(length)
        for ref in self._by_blob().get(blob, ()):
            lo, hi = max(start, ref.blob_offset), min(start + length, ref.blob_offset + ref.compressed_length)
            if lo < hi:
                frame = self.frame(ref)
                if len(frame) < ref.compressed_length:
                    frame = frame + bytes(ref.compressed_length - len(frame))
                data[lo - start:hi - start] = frame[lo - ref.blob_offset:hi - ref.blob_offset]
        return bytes(data)

    def _by_blob(self) -> dict[str, list[ChunkRef]]:
        cached = self.__dict__.get("_blobs")
        if cached is None:
            cached = {}
            for ref in self.refs:
                cached.setdefault(ref.blob, []).append(ref)
            object.__setattr__(self, "_blobs", cached)
        return cached


def synthetic(working_set_bytes: int, seed: int = 1, layers: int = 3, real_bytes: bool = False) -> Feed:
    """An image about 4× the working set; the profile reads a quarter of its frames, in runs (a
    file read whole) scattered over the layers, in an order that is not the blobs' order."""
    rng = random.Random(seed)
    image_frames: list[list[ChunkRef]] = [[] for _ in range(layers)]
    offsets = [0] * layers
    payloads: dict[str, bytes] = {}
    total, n = 0, 0
    while total < 4 * working_set_bytes:
        layer = rng.randrange(layers)
        big = rng.random() < 0.4  # a piece of a large file (1 MiB, zstd ≈ 0.6) or a packed frame of small files
        length = CHUNK if big else rng.randint(16 << 10, CHUNK)
        clen = max(512, int(length * rng.uniform(0.3, 0.8)))
        if real_bytes:
            data = rng.randbytes(clen)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            payloads[digest] = data
        else:
            digest = "sha256:" + hashlib.sha256(f"{seed}/{n}".encode()).hexdigest()
        blob = "sha256:" + hashlib.sha256(f"layer{seed}/{layer}".encode()).hexdigest()
        image_frames[layer].append(ChunkRef(digest, length, REPOSITORY, blob, offsets[layer], clen))
        offsets[layer] += clen
        total += clen
        n += 1
    picked: dict[ChunkRef, None] = {}
    taken = 0
    while taken < working_set_bytes:
        frames = image_frames[rng.randrange(layers)]
        start = rng.randrange(len(frames))
        for ref in frames[start:start + rng.randint(1, 8)]:
            if ref not in picked and taken < working_set_bytes:
                picked[ref] = None
                taken += ref.compressed_length
    payloads = {r.digest: payloads[r.digest] for r in picked} if real_bytes else {}
    return Feed(tuple(picked), f"synthetic TOC and profile: {len(picked)} frames, seed {seed}",
                payloads if real_bytes else None)


def from_layout(layout: Path, profile: Path | None = None) -> Feed:
    """The frames of a converted image in an OCI layout, in the profile's read order (every frame of
    the image, in blob order, without a profile)."""
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads(_blob(layout, manifest_digest).read_text())
    by_layer: dict[str, dict[int, ChunkRef]] = {}
    for layer in manifest["layers"]:
        path = _blob(layout, layer["digest"])
        _, toc = asyncio.run(read_toc(FileRangeReader(path)))
        by_layer[layer["digest"]] = {r.blob_offset: r for r in layer_refs(toc, REPOSITORY, layer["digest"])}
    from .feed_files import ordered  # the same ordering as every real feed

    return ordered(by_layer, profile, str(layout))


def _blob(layout: Path, digest: str) -> Path:
    algorithm, _, hexpart = digest.partition(":")
    return layout / "blobs" / algorithm / hexpart
