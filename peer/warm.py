"""Warm-up and prefetch: every chunk of an image through the ordinary fetch path, in parallel."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass

from converter.format.annotations import is_seekable_descriptor
from converter.format.layer_reader import location_from_annotations, read_toc
from converter.format.toc import Toc
from converter.registry.blob_reader import RegistryBlobReader
from converter.registry.client import RegistryClient
from converter.registry.manifest import parse_manifest
from converter.registry.reference import ImageReference
from peer.chunk import ChunkRef
from peer.fetcher import ChunkFetcher


@dataclass
class WarmProgress:
    """What a warm-up has done so far (the node's /v1/warm streams it)."""

    stage: str = "resolving"  # resolving (manifest, TOCs) → fetching
    chunks: int = 0  # to fetch
    done: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def image_chunks(client: RegistryClient, image: str) -> tuple[list[ChunkRef], int]:
    """The distinct chunks of an image's seekable layers, and how many layers were not seekable."""
    ref = ImageReference.parse(image)
    fetched, _ = await client.resolve_image(ref)
    manifest = parse_manifest(fetched.body, fetched.media_type, str(ref))
    repository = f"{ref.registry}/{ref.repository}"
    chunks: dict[str, ChunkRef] = {}
    skipped = 0
    for desc in manifest["layers"]:
        if not is_seekable_descriptor(desc):
            skipped += 1
            continue
        reader = RegistryBlobReader(client, ref, desc["digest"], desc["size"])
        _, toc = await read_toc(reader, location_from_annotations(desc.get("annotations")))
        for chunk_ref in layer_refs(toc, repository, desc["digest"]):
            chunks.setdefault(chunk_ref.digest, chunk_ref)
    return list(chunks.values()), skipped


def layer_refs(toc: Toc, repository: str, blob: str) -> list[ChunkRef]:
    """One ref per distinct frame of a layer, in blob order: in format v2 several files' chunks
    share a frame (same blob offset), which is fetched once."""
    frames = sorted({c.blob_offset: c for e in toc.entries for c in e.chunks}.values(), key=lambda c: c.blob_offset)
    return [ChunkRef.from_chunk(chunk, repository, blob, following.blob_offset if following is not None else 0)
            for chunk, following in zip(frames, [*frames[1:], None])]


async def warm(fetcher: ChunkFetcher, refs: list[ChunkRef], parallel: int,
               progress: WarmProgress | None = None) -> dict[str, object]:
    """Fetch every chunk in `refs` (at most `parallel` at once); a summary by serving tier.

    A chunk already cached is not read (it was verified when it came in); a fetched one is verified
    once, by the fetcher, and lands in the cache.
    """
    started = time.monotonic()
    slots = asyncio.Semaphore(parallel)
    tiers: Counter[str] = Counter()
    progress = progress or WarmProgress()
    progress.stage, progress.chunks = "fetching", len(refs)
    total = 0

    async def one(ref: ChunkRef) -> None:
        nonlocal total
        async with slots:
            tier = await fetcher.ensure(ref, use_peers=True, background=False)
        tiers[tier] += 1
        total += ref.length
        progress.done += 1
        progress.bytes = total

    async with asyncio.TaskGroup() as group:
        for ref in refs:
            group.create_task(one(ref))
    await fetcher.flush()  # warmed means: in this node's disk cache
    return {"chunks": len(refs), "bytes": total, "tiers": dict(tiers), "seconds": round(time.monotonic() - started, 3)}
