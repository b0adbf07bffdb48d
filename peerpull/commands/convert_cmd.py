"""`peerpull convert SRC DST`: make a seekable copy of an image and push it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from converter.conversion.convert import Converter, ConvertReport
from converter.conversion.image_source import LayoutSource, open_source
from converter.format.errors import ConfigError
from converter.registry.client import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from peerpull.config import PeerpullConfig
from peerpull.options import parse_size

_R = RegistryConfig()
DESCRIPTION = f"""\
Convert an image into a seekable image: every layer becomes independent zstd frames (small
files packed together, large files cut into chunks) with a table of contents at its end, still
a valid tar+zstd layer, so nodes without peerpull run the same tag unchanged. Layers are converted in parallel and pushed to DST.

SRC is a registry reference (host[:port]/repo:tag or @sha256:...) or an OCI image layout
directory (oci:DIR[:TAG]). DST is a registry reference. Converting an image that is already
seekable converts nothing and says so. Credentials come from docker's config.json.
DST equal to SRC (same registry, repository and tag) overwrites the tag: that needs --force.
The --work-dir and --json outputs are checked writable before any work starts.

--platform picks from a multi-platform image (default linux/amd64); given explicitly, a
single-platform image of another platform is refused (exit 8) naming the one it has.

Registry limits (docs/format.md §10): manifests {MAX_MANIFEST_BYTES >> 20} MiB, configs {MAX_CONFIG_BYTES >> 20} MiB, layers their
descriptor's size; connect {_R.connect_timeout_s:g} s, idle read {_R.read_timeout_s:g} s, {_R.request_deadline_s:g} s per bounded request with
retries; a layer download slower than {_R.min_speed_bytes_s} bytes/s resumes (PEERPULL_REGISTRY_CONNECT_TIMEOUT_S,
_READ_TIMEOUT_S, _REQUEST_DEADLINE_S, _MIN_SPEED_BYTES_S, _RETRIES).

examples:
  peerpull convert 127.0.0.1:5000/app:1.0 127.0.0.1:5000/app:1.0-seekable
  peerpull convert oci:./layout:latest registry.local:5000/app:seekable --insecure-registry registry.local:5000
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("convert", help="convert an image to the seekable format and push it",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="image to convert: registry reference or oci:DIR[:TAG]")
    p.add_argument("destination", metavar="DST", help="registry reference to push the seekable image to")
    p.add_argument("--chunk-size", type=parse_size, help="bytes of file content per zstd frame (default 1MiB; 4KiB..16MiB)")
    p.add_argument("--level", type=int, help="zstd compression level 1..22 (default 3)")
    p.add_argument("--format-version", type=int, choices=(1, 2),
                   help="seekable format to write: 2 (default) packs small files into shared ~chunk-size frames, "
                        "1 gives every file frames of its own (docs/format.md)")
    p.add_argument("--jobs", type=int, help="layers converted at once (default: number of cores)")
    p.add_argument("--work-dir", metavar="DIR", help="where converted layers wait for upload (default: system temp dir)")
    p.add_argument("--json", metavar="FILE", help="also write the conversion report as JSON to FILE ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    p.add_argument("--force", action="store_true", help="allow DST to be the same image reference as SRC")
    p.set_defaults(handler=run)
    return p


class _RichProgress:
    """Per-layer progress bars (source bytes); rich's Progress is safe to update from threads."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, Any] = {}

    def layer_started(self, digest: str, total_bytes: int) -> None:
        self._tasks[digest] = self._progress.add_task(digest[7:19], total=total_bytes)

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        self._progress.update(self._tasks[digest], advance=nbytes)

    def layer_finished(self, digest: str) -> None:
        task = self._tasks[digest]
        self._progress.update(task, completed=self._progress.tasks[task].total)


def report_json(report: ConvertReport) -> dict[str, Any]:
    return {**asdict(report), "uncompressed_bytes": report.uncompressed_bytes}


def print_summary(report: ConvertReport, console: Console) -> None:
    if report.already_seekable:
        console.print(f"{report.source} is already seekable: nothing converted; pushed as {report.destination}")
        return
    table = Table(title=f"{report.source} → {report.destination}")
    for column in ("layer", "source", "seekable", "ratio", "uncompressed", "files+dirs", "chunks", "frames", "TOC", "MB/s"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    for layer in report.layers:
        if not layer.converted:
            table.add_row(layer.source_digest[7:19], _mb(layer.source_size), "already seekable", "", "", "", "", "", "", "")
            continue
        rate = (layer.uncompressed_size or 0) / 1e6 / layer.seconds if layer.seconds else 0.0
        table.add_row(layer.source_digest[7:19], _mb(layer.source_size), _mb(layer.size),
                      f"{layer.size / max(1, layer.source_size):.2f}", _mb(layer.uncompressed_size or 0),
                      str(layer.entries), str(layer.chunks), str(layer.frames), f"{(layer.toc_bytes or 0) / 1024:.1f} KiB", f"{rate:.0f}")
    console.print(table)
    src = sum(layer.source_size for layer in report.layers)
    out = sum(layer.size for layer in report.layers)
    rate = report.uncompressed_bytes / 1e6 / report.seconds if report.seconds else 0.0
    console.print(f"converted {len(report.layers)} layers in {report.seconds:.1f} s ({rate:.0f} MB/s uncompressed); "
                  f"{_mb(src)} → {_mb(out)} ({out / max(1, src):.2f}×); manifest {report.manifest_digest}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def check_writable_file(path: str, what: str) -> None:
    """Fail now, before any work, when `path` cannot be written (it is left as it was)."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot write it ({exc.strerror or type(exc).__name__}); "
                          "choose a writable path") from None
    if not existed:
        os.unlink(path)


def check_writable_dir(path: str | None, what: str) -> None:
    directory = path or tempfile.gettempdir()
    try:
        fd, name = tempfile.mkstemp(prefix=".peerpull-check-", dir=directory)
    except OSError as exc:
        raise ConfigError(f"{what} {directory}: cannot write there ({exc.strerror or type(exc).__name__}); "
                          "choose a writable directory with --work-dir") from None
    os.close(fd)
    os.unlink(name)


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    dest = ImageReference.parse(args.destination)
    show = sys.stderr.isatty() and not args.quiet
    check_writable_dir(config.convert.work_dir, "work dir")
    if args.json and args.json != "-":
        check_writable_file(args.json, "--json")
    async with RegistryClient(config.registry) as client:
        source = open_source(args.source, client, config.registry.platform)
        if (not args.force and not isinstance(source, LayoutSource) and source.registry_ref is not None
                and str(source.registry_ref) == str(dest)):
            raise ConfigError(f"destination {dest} is the source image: converting would overwrite it; "
                              "pass --force to do so, or choose another tag")
        if show:
            columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
            with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
                report = await Converter(client, config.convert, _RichProgress(progress)).convert(source, dest)
        else:
            report = await Converter(client, config.convert).convert(source, dest)
    if not args.quiet:
        print_summary(report, Console(width=None if sys.stdout.isatty() else 160))
    if args.json:
        text = json.dumps(report_json(report), indent=2)
        if args.json == "-":
            print(text)
        else:
            try:
                with open(args.json, "w") as f:
                    f.write(text + "\n")
            except OSError as exc:
                raise ConfigError(f"--json {args.json}: cannot write the report ({exc.strerror}); the image "
                                  f"was pushed as {report.destination}") from None
    return 0
