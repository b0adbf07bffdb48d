"""Real feeds for the simulation: a saved TOC + startup profile, a registry reference, the default.

A *saved feed* is a directory with `toc.json` (every frame of every seekable layer of one image:
`{"kind": "peerpull-sim-toc", "layers": [{"digest", "frames": [[blob_offset, compressed_length,
length, digest], …]}], …}`) and `profile.json` (the daemon's own startup-profile document,
snapshotter/service/profiles.py: layers and `[layer index, frame offset]` reads in first-read
order). `bench/cluster --save-feed DIR` writes one from a real run; the realistic torch image's
is kept at /var/cache/peerpull-bench/sim-feed. Without a profile the working set is every frame
of the image in blob order (a container that reads the whole image), and the feed says so.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peer.chunk import ChunkRef

from .feed import REPOSITORY, Feed

TOC_KIND = "peerpull-sim-toc"
DEFAULT_FEED = Path("/var/cache/peerpull-bench/sim-feed")
NO_PROFILE = "no startup profile: every frame of the image in blob order (a container reading all of it)"


def save_toc(path: Path, source: str, manifest_digest: str, refs: Iterable[ChunkRef]) -> None:
    """Write the frames of `refs` (one image's) as a TOC file."""
    layers: dict[str, list[list[Any]]] = {}
    for ref in sorted(refs, key=lambda r: (r.blob, r.blob_offset)):
        layers.setdefault(ref.blob, []).append([ref.blob_offset, ref.compressed_length, ref.length, ref.digest])
    doc = {"kind": TOC_KIND, "version": 1, "source": source, "manifest_digest": manifest_digest,
           "layers": [{"digest": blob, "frames": frames} for blob, frames in layers.items()]}
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")


def read_toc_file(path: Path) -> tuple[dict[str, dict[int, ChunkRef]], str]:
    """Frames by layer and offset, and the manifest digest, of a TOC file."""
    doc = json.loads(path.read_text())
    if doc.get("kind") != TOC_KIND:
        raise ValueError(f"{path} is not a {TOC_KIND} file")
    by_layer: dict[str, dict[int, ChunkRef]] = {}
    for layer in doc["layers"]:
        frames = sorted(layer["frames"])
        by_layer[layer["digest"]] = {
            offset: ChunkRef(digest, length, REPOSITORY, layer["digest"], offset, clen,
                             following[0] if following is not None else 0)
            for (offset, clen, length, digest), following in zip(frames, [*frames[1:], None])}
    return by_layer, str(doc.get("manifest_digest", ""))


def ordered(by_layer: dict[str, dict[int, ChunkRef]], profile: Path | None, source: str) -> Feed:
    """The working set: the profile's reads in order (distinct frames), else every frame."""
    if profile is None or not profile.exists():
        refs = [r for frames in by_layer.values() for _, r in sorted(frames.items())]
        described = f"{source}, {NO_PROFILE}"
    else:
        doc = json.loads(profile.read_text())
        layers = doc["layers"]
        refs = [by_layer[layers[i]][offset] for i, offset in doc["reads"]
                if layers[i] in by_layer and offset in by_layer[layers[i]]]
        described = f"{source} with profile {profile}"
    seen: set[str] = set()
    unique = []
    for ref in refs:
        if ref.digest not in seen:
            seen.add(ref.digest)
            unique.append(ref)
    return Feed(tuple(unique), f"{described}: {len(unique)} frames")


def from_saved(directory: Path, profile: Path | None = None) -> Feed:
    """A saved feed directory (or a TOC file); `profile` overrides the directory's profile.json."""
    toc = directory / "toc.json" if directory.is_dir() else directory
    by_layer, _ = read_toc_file(toc)
    return ordered(by_layer, profile or toc.parent / "profile.json", f"TOC {toc}")


def from_registry(reference: str, profile: Path | None, insecure: bool = True) -> Feed:
    """The TOCs of a seekable image in a registry (ranged reads, as peer/warm.py does)."""
    refs, _ = asyncio.run(registry_refs(reference, insecure))
    by_layer: dict[str, dict[int, ChunkRef]] = {}
    for ref in refs:
        by_layer.setdefault(ref.blob, {})[ref.blob_offset] = ChunkRef(
            ref.digest, ref.length, REPOSITORY, ref.blob, ref.blob_offset, ref.compressed_length, ref.next_offset)
    return ordered(by_layer, profile, f"registry {reference}")


async def registry_refs(reference: str, insecure: bool = True) -> tuple[list[ChunkRef], str]:
    """Every distinct frame of a seekable image in a registry, and its manifest digest."""
    from converter.registry.client import RegistryClient
    from converter.registry.config import RegistryConfig
    from converter.registry.reference import ImageReference
    from peer.warm import image_chunks

    host = ImageReference.parse(reference).registry
    async with RegistryClient(RegistryConfig(insecure_hosts=(host,) if insecure else ())) as client:
        refs, _ = await image_chunks(client, reference)
        fetched, _ = await client.resolve_image(ImageReference.parse(reference))
    return refs, fetched.digest
