"""How much of each image the node daemon serves lazily is local: its layers' frames in the chunk cache.

Images are read from the snapshot store (the layers containerd prepared, labelled with the image
reference), so they survive a restart; a layer shared by two images counts for both. Frames are
counted as stored (compressed), the unit the cache and the registry hold.
"""

from __future__ import annotations

import asyncio
from typing import Any

from peer.cache import ChunkCache
from snapshotter.fs.fusefs import LayerFS
from snapshotter.service.remote import LABEL_IMAGE_REF, LABEL_MANIFEST_DIGEST
from snapshotter.service.store import SnapshotStore


class ImageLocality:
    def __init__(self, store: SnapshotStore, fs: LayerFS) -> None:
        self._store = store
        self._fs = fs

    def _images(self) -> dict[str, tuple[str, list[str]]]:
        """image ref → (manifest digest, lazily served layers, bottom first), from the snapshot chains."""
        out: dict[str, tuple[str, list[str]]] = {}
        for snap in self._store.all():
            image = snap.labels.get(LABEL_IMAGE_REF)
            if not snap.layer or not image:
                continue
            chain = [c.layer for c in reversed(self._store.chain(snap)) if c.layer]
            manifest, layers = out.get(image, (snap.labels.get(LABEL_MANIFEST_DIGEST, ""), []))
            for layer in [*chain, snap.layer]:
                if layer not in layers:
                    layers.append(layer)
            out[image] = (manifest, layers)
        return out

    def _locality(self, images: dict[str, tuple[str, list[str]]], cache: ChunkCache) -> list[dict[str, Any]]:
        report = []
        for image, (manifest, layers) in sorted(images.items()):
            chunks = local_chunks = size = local = mounted = 0
            for layer in layers:
                source = self._fs.source(layer)
                if source is None:
                    continue
                mounted += 1
                for chunk in source.chunks:
                    chunks += 1
                    size += chunk.compressed_length
                    if cache.known(chunk.digest_hex):
                        local_chunks += 1
                        local += chunk.compressed_length
            report.append({"image": image, "manifest": manifest, "layers": len(layers), "layers_mounted": mounted,
                           "chunks": chunks, "chunks_local": local_chunks, "bytes": size, "bytes_local": local,
                           "local_ratio": local / size if size else 0.0})
        return report

    async def report(self, cache: ChunkCache) -> list[dict[str, Any]]:
        images = await self._store.run(self._images)
        return await asyncio.to_thread(self._locality, images, cache)
