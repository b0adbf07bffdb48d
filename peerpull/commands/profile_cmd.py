"""`peerpull profile show IMAGE`: the startup profile the registry holds for an image."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from converter.format import toc as fmt
from converter.format.errors import NotFoundError
from converter.format.layer_reader import location_from_annotations, read_toc_frame
from converter.registry.blob_reader import RegistryBlobReader
from converter.registry.client import RegistryClient
from converter.registry.manifest import parse_manifest
from converter.registry.reference import ImageReference
from peerpull.config import PeerpullConfig
from snapshotter.service import profiles as pf
from snapshotter.service.profiles_source import registry_profile

DESCRIPTION = f"""\
Show the startup profile of IMAGE: the chunks its containers read first, which node daemons record
and push next to the image as an OCI artifact (artifactType {pf.PROFILE_MEDIA_TYPE}), found
through the registry's referrers API or the `sha256-<hex>` fallback tag. Reads the manifest, the
profile and the TOCs of the layers it names (ranged reads): nothing is downloaded. Entries that name
no chunk of the image are counted as stale (a profile is a hint: they are ignored).
Exit status 7 when the registry holds no profile for the image. --json includes the profile
document itself ("profile"): `peerpull convert SRC DST --profile FILE` reads that output.

examples:
  peerpull profile show registry.example.com/ml/torch:2.13      # chunks, bytes, layers, stale entries
  peerpull profile show --json 127.0.0.1:5000/app:1 | jq .chunks
  peerpull run 127.0.0.1:5000/app:1 && peerpull profile show 127.0.0.1:5000/app:1   # learn one, then look
  peerpull profile show --json 127.0.0.1:5000/app:1 > p.json && peerpull convert SRC DST --profile p.json
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("profile", help="show an image's startup profile",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("show",), help="show: chunk count, bytes and layers of the profile")
    p.add_argument("image", metavar="IMAGE", help="registry reference, e.g. registry:5000/repo:tag")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)
    return p


async def _layer_chunks(client: RegistryClient, ref: ImageReference, desc: dict[str, Any]) -> dict[int, fmt.Chunk]:
    """The layer's frames by blob offset (empty for a layer that is not seekable)."""
    location = location_from_annotations(desc.get("annotations"))
    if location is None:
        return {}
    footer, frame = await read_toc_frame(RegistryBlobReader(client, ref, desc["digest"], desc["size"]), location)
    toc = await asyncio.to_thread(fmt.decode_toc, frame, footer)
    return {c.blob_offset: c for e in toc.entries for c in e.chunks}


async def summary(client: RegistryClient, image: str) -> dict[str, Any]:
    ref = ImageReference.parse(image)
    fetched, _ = await client.resolve_image(ref)
    manifest = parse_manifest(fetched.body, fetched.media_type, str(ref))
    profile = await registry_profile(client, image, fetched.digest)
    if profile is None:
        raise NotFoundError(f"{image}: the registry holds no startup profile for manifest {fetched.digest} "
                            "(a node daemon pushes one after the image's first container start)")
    descs = {d["digest"]: d for d in manifest["layers"]}
    layers = []
    for blob in profile.layers:
        frames = await _layer_chunks(client, ref, descs[blob]) if blob in descs else {}
        hits = [frames[o] for b, o in profile.reads if b == blob and o in frames]
        layers.append({"digest": blob, "chunks": len(hits), "bytes": sum(c.compressed_length for c in hits)})
    chunks = sum(int(layer["chunks"]) for layer in layers)
    return {"image": image, "manifest_digest": fetched.digest, "chunks": chunks,
            "bytes": sum(int(layer["bytes"]) for layer in layers), "stale": len(profile.reads) - chunks,
            "layers": layers, "profile": json.loads(pf.encode(profile))}


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    async with RegistryClient(config.registry) as client:
        info = await summary(client, args.image)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['image']} ({info['manifest_digest'][:19]}): {info['chunks']} chunks, "
          f"{info['bytes'] / 1e6:.1f} MB compressed, in {len(info['layers'])} layers"
          + (f"; {info['stale']} stale entries ignored" if info["stale"] else ""))
    for layer in info["layers"]:
        print(f"  {layer['digest'][7:19]}  {layer['chunks']:>7} chunks  {layer['bytes'] / 1e6:9.1f} MB")
    return 0
