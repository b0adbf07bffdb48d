"""`peerpull build -f Dockerfile -t REF [CONTEXT]`: a Dockerfile to a seekable image in the registry."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console
from rich.table import Table

from converter.conversion.convert import ConvertReport
from converter.conversion.image_source import open_source
from converter.format.errors import ConfigError
from converter.registry.client import RegistryClient
from converter.registry.reference import ImageReference
from peerpull.builder import Buildah, find_buildah, parse_step
from peerpull.commands.convert_cmd import check_writable_file, convert_image, report_json
from peerpull.config import PeerpullConfig
from peerpull.options import parse_size
from peerpull.progress import Progress

log = structlog.get_logger(__name__)

DESCRIPTION = """\
Build CONTEXT (default .) with its Dockerfile, convert the result to a seekable image and push it
as TAG: one tag every node runs, lazily where peerpull serves it and as an ordinary image (valid
tar+zstd layers) on plain containerd.

The builder is buildah (Debian's `buildah` package, as root): its storage (vfs driver) lives in a
private directory, a new one under /var/tmp removed afterwards unless --storage-dir is given, so
the host's container storage is never touched. RUN steps use chroot isolation. The built image is
written as an OCI layout and handed to the converter (as `peerpull convert oci:DIR:TAG TAG`);
--push-original also pushes the image as buildah built it. --profile passes through to convert
(`learn` runs the new image once on a private set-up and converts again with its startup files
first; arguments after `--` replace its Cmd for that run).

On a terminal the build's steps and the conversion show progress bars; otherwise they are logged
as structured events (build_step, convert_layer_done). The summary gives layers, sizes, chunks and
the time of each stage; --json writes it as an object.

FROM images are pulled by buildah itself: use a registry it can reach, a local image (FROM
scratch and COPY a static binary), or --insecure-registry for a plain-HTTP one.

exit codes: 0 pushed; 1 the build failed (the line ends with buildah's last lines); 2 bad usage
(buildah missing: install the buildah package; not root; no Dockerfile; an unwritable --json);
4/6 the registry refused a push (6: credentials); others as listed by `peerpull --help`.

examples:
  peerpull build -t 127.0.0.1:5000/app:seekable .
  peerpull build -f docker/Dockerfile -t registry.local:5000/app:1 --push-original registry.local:5000/app:1-plain ctx/
  peerpull build -t 127.0.0.1:5000/app:fast --profile learn . -- /app/server --selftest
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("build", usage="peerpull build [options] -t TAG [CONTEXT] [-- ARG ...]",
                            help="build a Dockerfile with buildah into a seekable image and push it",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("context", metavar="CONTEXT", nargs="?", default=".", help="build context directory (default .)")
    p.add_argument("-f", "--file", dest="dockerfile", metavar="DOCKERFILE",
                   help="the Dockerfile (default CONTEXT/Dockerfile)")
    p.add_argument("-t", "--tag", required=True, metavar="TAG", help="registry reference of the seekable image")
    p.add_argument("--push-original", metavar="REF", help="also push the image as built (not seekable) to REF")
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V", help="a build argument (repeatable)")
    p.add_argument("--profile", metavar="SOURCE", help="startup-first layout, as `peerpull convert --profile`")
    p.add_argument("--learn-timeout", type=float, default=600.0, metavar="S",
                   help="--profile learn: give up on the learning run after S seconds (default 600)")
    p.add_argument("--chunk-size", type=parse_size, help="bytes of file content per zstd frame (default 1MiB)")
    p.add_argument("--storage-dir", metavar="DIR", help="buildah's storage and the OCI layout (kept; default a "
                   "temporary directory under /var/tmp, removed afterwards)")
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON to FILE ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")
    p.set_defaults(handler=run)
    return p


@dataclass
class BuildSummary:
    destination: str
    original: str | None = None
    image_id: str = ""
    manifest_digest: str = ""
    layers: int = 0
    original_bytes: int = 0  # the built layers as buildah exported them (gzip)
    seekable_bytes: int = 0
    uncompressed_bytes: int = 0
    chunks: int = 0
    frames: int = 0
    steps: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # stage → seconds
    convert: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, dest: str, original: str | None, image_id: str, steps: int, stages: dict[str, float],
           report: ConvertReport) -> BuildSummary:
        return cls(dest, original, image_id, report.manifest_digest, len(report.layers),
                   sum(layer.source_size for layer in report.layers), sum(layer.size for layer in report.layers),
                   report.uncompressed_bytes, sum(layer.chunks or 0 for layer in report.layers),
                   sum(layer.frames or 0 for layer in report.layers), steps, stages, report_json(report))


def _inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    context = Path(args.context)
    if not context.is_dir():
        raise ConfigError(f"build context {context} is not a directory")
    dockerfile = Path(args.dockerfile) if args.dockerfile else context / "Dockerfile"
    if not dockerfile.is_file():
        raise ConfigError(f"Dockerfile {dockerfile} not found; give one with -f FILE")
    return context, dockerfile


def _storage(args: argparse.Namespace) -> tuple[Path, bool]:
    """(directory, whether to remove it afterwards)."""
    if args.storage_dir:
        path = Path(args.storage_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--storage-dir {path}: cannot create it ({exc.strerror})") from None
        return path, False
    root = Path("/var/tmp")  # a disk, not a tmpfs: vfs storage holds a full copy per layer
    return Path(tempfile.mkdtemp(prefix="peerpull-build-", dir=root if root.is_dir() else None)), True


def print_summary(s: BuildSummary, console: Console) -> None:
    table = Table(title=f"peerpull build → {s.destination}")
    for column in ("stage", "seconds"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for stage, seconds in s.stages.items():
        table.add_row(stage, f"{seconds:.2f}")
    table.add_row("total", f"{sum(s.stages.values()):.2f}")
    console.print(table)
    console.print(f"{s.steps} steps, {s.layers} layers: built {s.original_bytes / 1e6:.1f} MB (gzip) → seekable "
                  f"{s.seekable_bytes / 1e6:.1f} MB ({s.uncompressed_bytes / 1e6:.1f} MB uncompressed), "
                  f"{s.chunks} chunks in {s.frames} frames; manifest {s.manifest_digest}"
                  + (f"; original pushed as {s.original}" if s.original else ""), markup=False, highlight=False)
    if (lay := s.convert.get("layout")) is not None:
        console.print(f"startup-first layout: {lay['moved_files']} startup files moved to the front; the working set "
                      f"spans {lay['span_before']} → {lay['span_after']} frames", markup=False, highlight=False)


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    find_buildah()
    if os.geteuid() != 0:
        raise ConfigError("peerpull build runs buildah as root (rootful, with private vfs storage): run it as root")
    context, dockerfile = _inputs(args)
    dest = ImageReference.parse(args.tag)
    original = str(ImageReference.parse(args.push_original)) if args.push_original else None
    if args.json and args.json != "-":
        check_writable_file(args.json, "--json")
    if args.trailing and args.profile != "learn":
        raise ConfigError("arguments after `--` are the learning run's command: they need --profile learn")
    if args.profile == "learn" and os.geteuid() != 0:
        raise ConfigError("--profile learn runs the image on a private containerd and needs root")
    tty = sys.stderr.isatty() and not args.quiet
    storage, remove = _storage(args)
    stages: dict[str, float] = {}
    local = f"localhost/peerpull-build-{uuid.uuid4().hex[:10]}:latest"
    try:
        buildah = Buildah(storage, config.registry)
        t = time.monotonic()
        steps = 0
        with Progress("build_progress", f"build {dockerfile}", enabled=tty) as bar:
            def on_build_line(line: str) -> None:
                nonlocal steps
                step = parse_step(line)
                if step is None:
                    return
                steps = step.count
                bar.update(completed=step.index, total=step.count, text=f"STEP {step.index}/{step.count}: {step.instruction[:60]}")
                if not tty and not args.quiet:
                    log.info("build_step", step=step.index, steps=step.count, instruction=step.instruction)

            image_id = await buildah.build(dockerfile, context, local, args.build_arg, on_build_line)
        stages["build"] = time.monotonic() - t
        t = time.monotonic()
        source_text = await buildah.export_layout(local, storage / "layout", "latest", lambda line: None)
        stages["export OCI layout"] = time.monotonic() - t
        if original:
            t = time.monotonic()
            await buildah.push(local, original, lambda line: None)
            stages["push original"] = time.monotonic() - t
        t = time.monotonic()
        args.source = source_text  # convert_image's profile path reads these as `peerpull convert` would
        async with RegistryClient(config.registry) as client:
            source = open_source(source_text, client, config.registry.platform)
            report = await convert_image(args, config, client, source, dest, tty)
        stages["convert + push seekable"] = time.monotonic() - t
    finally:
        if remove:
            shutil.rmtree(storage, ignore_errors=True)
    summary = BuildSummary.of(str(dest), original, image_id, steps, {k: round(v, 3) for k, v in stages.items()},
                              report)
    log.info("build_done", destination=summary.destination, layers=summary.layers,
             seekable_bytes=summary.seekable_bytes, seconds=round(sum(stages.values()), 3))
    if not args.quiet:
        print_summary(summary, Console(stderr=args.json == "-", width=None if sys.stdout.isatty() else 160))
    if args.json:
        text = json.dumps(summary.__dict__, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
