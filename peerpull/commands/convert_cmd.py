"""`peerpull convert SRC DST`: make a seekable copy of an image and push it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from converter.conversion.convert import Converter, ConvertReport, config_diff_ids
from converter.conversion.image_source import ImageSource, LayoutSource, open_source
from converter.format.errors import ConfigError, PeerpullError
from converter.registry.client import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from peerpull.commands import convert_profile as cp
from peerpull.commands.run_cmd import global_args
from peerpull.config import PeerpullConfig
from peerpull.options import parse_size
from peerpull.testbed.runner import RunOptions, run_image
from snapshotter.service import profiles as pf
from snapshotter.service.profiles_source import registry_profile

log = structlog.get_logger(__name__)
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
On a terminal a progress bar per layer shows on stderr; otherwise (piped, CI) each layer logs
convert_layer_started and convert_layer_done (structured, JSON lines), and --quiet silences both.

--platform picks from a multi-platform image (default linux/amd64); given explicitly, a
single-platform image of another platform is refused (exit 8) naming the one it has.

Registry limits (docs/format.md §10): manifests {MAX_MANIFEST_BYTES >> 20} MiB, configs {MAX_CONFIG_BYTES >> 20} MiB, layers their
descriptor's size; connect {_R.connect_timeout_s:g} s, idle read {_R.read_timeout_s:g} s, {_R.request_deadline_s:g} s per bounded request with
retries; a layer download slower than {_R.min_speed_bytes_s} bytes/s resumes (PEERPULL_REGISTRY_CONNECT_TIMEOUT_S,
_READ_TIMEOUT_S, _REQUEST_DEADLINE_S, _MIN_SPEED_BYTES_S, _RETRIES).

--profile lays out each layer's startup files first (docs/format.md, "Startup-first layout"):
the files a container reads first, learnt from a startup profile, are moved to the front of their
layers and packed together, so the working set is one contiguous run of frames a node fetches in
a few large ranges. SOURCE is
  FILE      a profile: `peerpull profile show --json` output, or the bare profile document a node
            daemon pushes (then of SRC, or of an image converted from SRC in DST's or SRC's repository)
  registry  the profile the registry holds for SRC (when seekable) or for the image now at DST
  learn     convert once, push, run the image's entrypoint (arguments after `--` replace its Cmd)
            on a private containerd + peerpull daemon (needs root; as `peerpull run`), take the
            profile it recorded, then convert again with the layout and push (DST is written twice);
            an entrypoint that never exits (a server) is stopped after --learn-timeout, and what it
            read until then is the profile
Moved files change the uncompressed tar, so those layers get new diff_ids (the config is
rewritten); the tree containerd unpacks is the same. The pushed image gets a profile matching its
new layout, so nodes stream its working set at once. A profile is a hint: one that is missing, of
another image or stale is ignored with one warning line and the image converted without it.
The summary says how many files/bytes moved and the frames the working set spans before → after.
Each laid-out layer's uncompressed tar is spooled in --work-dir first (disk of its uncompressed
size; the system temp dir may be a tmpfs: give a disk directory for large images).

examples:
  peerpull convert 127.0.0.1:5000/app:1.0 127.0.0.1:5000/app:1.0-seekable
  peerpull convert oci:./layout:latest registry.local:5000/app:seekable --insecure-registry registry.local:5000
  peerpull convert 127.0.0.1:5000/app:1.0 127.0.0.1:5000/app:1.0-seekable --profile registry
  peerpull profile show --json 127.0.0.1:5000/app:1.0-seekable > startup.json
  peerpull convert 127.0.0.1:5000/app:1.0 127.0.0.1:5000/app:1.0-fast --profile startup.json
  peerpull convert 127.0.0.1:5000/ml/torch:1 127.0.0.1:5000/ml/torch:1-fast --profile learn -- python -c "import torch"
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("convert", usage="peerpull convert [options] SRC DST [--profile SOURCE] [-- ARG ...]",
                            help="convert an image to the seekable format and push it",
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
    p.add_argument("--profile", metavar="SOURCE",
                   help="lay out startup files first: a profile FILE, 'registry' or 'learn' (see above; "
                        "a file named like a keyword: ./registry)")
    p.add_argument("--learn-timeout", type=float, default=600.0, metavar="S",
                   help="--profile learn: give up on the container after S seconds (default 600)")
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


class _LoggedProgress:
    """Not on a terminal: one `convert_layer_started`/`convert_layer_done` pair per layer, no bar."""

    def __init__(self) -> None:
        self._started: dict[str, tuple[float, int]] = {}

    def layer_started(self, digest: str, total_bytes: int) -> None:
        self._started[digest] = (time.monotonic(), total_bytes)
        log.info("convert_layer_started", digest=digest, source_bytes=total_bytes)

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        pass

    def layer_finished(self, digest: str) -> None:
        t0, total = self._started.get(digest, (time.monotonic(), 0))
        log.info("convert_layer_done", digest=digest, source_bytes=total, seconds=round(time.monotonic() - t0, 3))


def report_json(report: ConvertReport) -> dict[str, Any]:
    out = {**asdict(dataclasses.replace(report, new_tocs={})), "uncompressed_bytes": report.uncompressed_bytes}
    del out["new_tocs"]  # they made the new profile, pushed next to the image
    return out


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
    if (lay := report.layout) is not None:
        pushed = f"; profile {lay['profile_artifact'][:19]} pushed" if lay["profile_artifact"] else ""
        console.print(f"startup-first layout: {lay['moved_files']} of {lay['startup_files']} startup files "
                      f"({_mb(lay['moved_bytes'])}) moved to the front of {lay['layers']} layers; working set "
                      f"{lay['frames_before']} frames in {lay['runs_before']} runs spanning {lay['span_before']} → "
                      f"{lay['frames_after']} in {lay['runs_after']} runs spanning {lay['span_after']}{pushed}",
                      markup=False, highlight=False)


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


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


async def _learn(args: argparse.Namespace, config: PeerpullConfig, client: RegistryClient, dest: ImageReference,
                 manifest_digest: str) -> pf.StartupProfile:
    """Run the just-pushed DST on a private set-up; the profile its daemon recorded and pushed."""
    opts = RunOptions(image=str(dest), mode="lazy", args=list(args.trailing), timeout_s=args.learn_timeout,
                      global_args=global_args(args, config))
    echo = (lambda text: None) if args.quiet else (lambda text: print(f"│ {text}", file=sys.stderr))
    try:
        result = await run_image(opts, config.registry, echo)
    except ConfigError:
        raise
    except PeerpullError as exc:  # e.g. a server that never exits: what it read until then still counts
        _warn(f"the learning run stopped: {exc}; using what the container read until then")
    else:
        if result.exit_code not in (0, None):
            _warn(f"the learning run's container exited {result.exit_code}; using what it read")
    profile = await registry_profile(client, str(dest), manifest_digest)
    if profile is None:
        raise cp.ProfileIgnored("the learning run recorded no profile (its container read nothing, or most "
                                "of the image: a whole-image read is no startup profile)")
    return profile


async def _convert_with_profile(args: argparse.Namespace, config: PeerpullConfig, client: RegistryClient,
                                source: ImageSource, dest: ImageReference,
                                convert: Callable[[dict[str, list[str]] | None], Awaitable[ConvertReport]]
                                ) -> ConvertReport:
    image = await source.resolve()
    source_ids = config_diff_ids(await source.read_blob(image.manifest["config"]["digest"]), args.source)
    first = await convert(None) if args.profile == "learn" else None
    try:
        if first is not None:
            profile = await _learn(args, config, client, dest, first.manifest_digest)
            profiled = await cp.profiled_image(client, profile, [dest])
        elif args.profile == "registry":
            profile, profiled = await cp.registry_lookup(client, source, image, dest)
        else:
            profile, shown_for = cp.read_profile_file(args.profile)
            repos = [r for r in (dest, source.registry_ref) if r is not None]
            if shown_for is not None and shown_for.registry in {r.registry for r in repos}:
                repos.insert(0, shown_for)  # a file never sends us to a registry we were not asked to use
            profiled = await cp.profiled_image(client, profile, repos)
        startup = await cp.plan(client, profile, profiled, image.manifest["layers"], source_ids)
    except ConfigError:
        raise
    except PeerpullError as exc:  # a hint that cannot be used (or read) never costs the conversion
        _warn(f"startup profile ignored: {exc}; converted without a startup-first layout")
        return first if first is not None else await convert(None)
    report = await convert(startup.by_layer)
    new = cp.new_profile(startup, report)
    pushed = None
    if new.reads:
        try:
            pushed = await cp.push_profile(client, dest, new)
        except PeerpullError as exc:
            _warn(f"the new image's startup profile was not pushed ({exc}); nodes will learn it on first start")
    report.layout = cp.layout_summary(startup, report, new, pushed)
    return report


async def convert_image(args: argparse.Namespace, config: PeerpullConfig, client: RegistryClient,
                        source: ImageSource, dest: ImageReference, show: bool) -> ConvertReport:
    """Convert `source` to `dest` (with `args.profile`'s layout when given): a bar per layer when
    `show`, otherwise one structured log line per layer unless `args.quiet`. `peerpull build` calls
    this too."""

    async def convert(startup: dict[str, list[str]] | None) -> ConvertReport:
        if show:
            columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn())
            with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
                return await Converter(client, config.convert, _RichProgress(progress)).convert(source, dest, startup)
        if args.quiet:
            return await Converter(client, config.convert).convert(source, dest, startup)
        return await Converter(client, config.convert, _LoggedProgress()).convert(source, dest, startup)

    if args.profile:
        return await _convert_with_profile(args, config, client, source, dest, convert)
    return await convert(None)


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    dest = ImageReference.parse(args.destination)
    show = sys.stderr.isatty() and not args.quiet
    check_writable_dir(config.convert.work_dir, "work dir")
    if args.json and args.json != "-":
        check_writable_file(args.json, "--json")
    if args.profile == "learn" and os.geteuid() != 0:
        raise ConfigError("--profile learn runs the image on a private containerd and needs root; "
                          "or pass a profile FILE or 'registry'")
    if args.trailing and args.profile != "learn":
        raise ConfigError("arguments after `--` are the learning run's command: they need --profile learn")
    async with RegistryClient(config.registry) as client:
        source = open_source(args.source, client, config.registry.platform)
        if (not args.force and not isinstance(source, LayoutSource) and source.registry_ref is not None
                and str(source.registry_ref) == str(dest)):
            raise ConfigError(f"destination {dest} is the source image: converting would overwrite it; "
                              "pass --force to do so, or choose another tag")

        report = await convert_image(args, config, client, source, dest, show)
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
