"""Describe an image: its layers, whether each is seekable, its format version, TOC size and frame count."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from converter.conversion.image_source import ImageSource
from converter.format import toc as fmt
from converter.format.annotations import is_seekable_descriptor
from converter.format.layer_reader import location_from_annotations, read_toc
from converter.registry.blob_reader import RegistryBlobReader
from converter.registry.client import RegistryClient


@dataclass(frozen=True)
class LayerInfo:
    digest: str
    media_type: str
    size: int
    seekable: bool
    toc_bytes: int | None = None
    toc_uncompressed_bytes: int | None = None
    chunks: int | None = None
    entries: int | None = None
    files: int | None = None
    chunk_size: int | None = None
    format_version: int | None = None
    frames: int | None = None  # distinct content frames: what a node fetches (chunks counts file pieces)


@dataclass
class ImageInfo:
    reference: str
    manifest_digest: str
    media_type: str
    seekable: bool
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total_size": self.total_size}


async def inspect_image(client: RegistryClient, source: ImageSource) -> ImageInfo:
    """Read the manifest and, for seekable layers, the footer and TOC through ranged reads."""
    image = await source.resolve()
    layers: list[LayerInfo] = []
    for desc in image.manifest["layers"]:
        if not is_seekable_descriptor(desc) or source.registry_ref is None:
            layers.append(LayerInfo(desc["digest"], desc.get("mediaType", ""), desc["size"], is_seekable_descriptor(desc)))
            continue
        reader = RegistryBlobReader(client, source.registry_ref, desc["digest"], desc["size"])
        footer, toc = await read_toc(reader, location_from_annotations(desc.get("annotations")))
        sizes = [e.size for e in toc.entries if e.type == fmt.FILE]
        layers.append(LayerInfo(
            digest=desc["digest"], media_type=desc["mediaType"], size=desc["size"], seekable=True,
            toc_bytes=footer.toc_length, toc_uncompressed_bytes=footer.toc_uncompressed,
            chunks=toc.chunk_count, entries=len(toc.entries), files=len(sizes), chunk_size=toc.chunk_size,
            format_version=footer.version, frames=toc.frame_count,
        ))
    return ImageInfo(
        reference=source.description, manifest_digest=image.digest, media_type=image.media_type,
        seekable=bool(layers) and all(layer.seekable for layer in layers), layers=layers,
    )
