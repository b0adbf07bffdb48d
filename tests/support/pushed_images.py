"""Small test images put into a registry by peerpull's own client (no skopeo needed).

`push_image` copies an OCI layout's image as it is (a plain gzip image stays plain);
`push_seekable` converts it in-process, as `peerpull convert` would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from converter.conversion.config import ConvertConfig
from converter.conversion.convert import Converter
from converter.conversion.image_source import LayoutSource
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from tests.support import images


@dataclass(frozen=True)
class PushedImage:
    ref: str  # registry reference
    manifest: dict
    config_digest: str
    layer_digests: list[str]


def build_small_layout(root: Path, files: int = 3, size: int = 200_000) -> Path:
    """An OCI layout with one gzip layer holding `files` files of `size` pseudo-random bytes."""
    import random

    rng = random.Random(11)
    layer = images.LayerBuilder()
    layer.dir("data")
    for i in range(files):
        layer.file(f"data/f{i}", rng.randbytes(size))
    images.write_oci_image(root, [layer.tar_bytes()])
    return root


async def push_image(layout: Path, address: str, repo: str, tag: str = "latest") -> PushedImage:
    image = images.read_oci_image(layout)
    ref = ImageReference.parse(f"{address}/{repo}:{tag}")
    async with RegistryClient(RegistryConfig()) as client:
        for layer in image.layers:
            await client.push_blob_file(ref, layer.digest, layer.path, layer.size)
        manifest_path = layout / "blobs" / "sha256" / image.manifest_digest.removeprefix("sha256:")
        body = manifest_path.read_bytes()
        manifest = json.loads(body)
        config_digest = manifest["config"]["digest"]
        config_path = layout / "blobs" / "sha256" / config_digest.removeprefix("sha256:")
        await client.push_blob_bytes(ref, config_path.read_bytes())
        await client.push_manifest(ref, body, manifest["mediaType"])
    return PushedImage(str(ref), manifest, config_digest, [d["digest"] for d in manifest["layers"]])


async def push_seekable(layout: Path, address: str, repo: str, tag: str = "latest") -> PushedImage:
    ref = ImageReference.parse(f"{address}/{repo}:{tag}")
    async with RegistryClient(RegistryConfig()) as client:
        report = await Converter(client, ConvertConfig(chunk_size=images.CHUNK, jobs=1)).convert(
            LayoutSource(layout, None, ""), ref)
        fetched = await client.get_manifest(ref.with_digest(report.manifest_digest))
    manifest = json.loads(fetched.body)
    return PushedImage(str(ref), manifest, manifest["config"]["digest"], [d["digest"] for d in manifest["layers"]])
