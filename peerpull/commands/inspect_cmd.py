"""`peerpull inspect IMAGE`: layers, TOC sizes, chunk counts and whether the image is seekable."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from converter.conversion.image_source import open_source
from converter.conversion.inspect import ImageInfo, inspect_image
from converter.registry.client import MAX_MANIFEST_BYTES, RegistryClient
from converter.registry.config import RegistryConfig
from peerpull.config import PeerpullConfig

_R = RegistryConfig()
DESCRIPTION = f"""\
Show an image's layers and, for seekable layers, their format version and what their table of
contents holds (chunks: file pieces; frames: what a node fetches, fewer in version 2). Only the
manifest and each TOC are read (ranged reads of the blob tails): nothing is downloaded.
Exit status is 0 whether or not the image is seekable; use --json to script on it.
A registry gets {_R.request_deadline_s:g} s per request, retries included (PEERPULL_REGISTRY_REQUEST_DEADLINE_S);
a manifest above {MAX_MANIFEST_BYTES >> 20} MiB, or a TOC larger than its footer says, is refused (docs/format.md §10).
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("inspect", help="show an image's layers and whether it is seekable",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", help="registry reference or oci:DIR[:TAG]")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run)
    return p


def print_table(info: ImageInfo, console: Console) -> None:
    table = Table(title=f"{info.reference} ({info.manifest_digest[:19]})")
    for column in ("layer", "media type", "size", "seekable", "format", "entries", "files", "chunks", "frames",
                   "chunk size", "TOC"):
        table.add_column(column)
    for layer in info.layers:
        table.add_row(
            layer.digest[7:19], layer.media_type.rsplit(".", 1)[-1], f"{layer.size / 1e6:.1f} MB",
            "yes" if layer.seekable else "no", _opt(layer.format_version), _opt(layer.entries), _opt(layer.files),
            _opt(layer.chunks), _opt(layer.frames), _opt(layer.chunk_size), f"{layer.toc_bytes / 1024:.1f} KiB" if layer.toc_bytes else "",
        )
    console.print(table)
    console.print(f"seekable: {'yes' if info.seekable else 'no'}; total {info.total_size / 1e6:.1f} MB in {len(info.layers)} layers")


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    async with RegistryClient(config.registry) as client:
        info = await inspect_image(client, open_source(args.image, client, config.registry.platform))
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        print_table(info, Console(width=None if sys.stdout.isatty() else 160))
    return 0
