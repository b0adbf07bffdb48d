"""`peerpull quickstart`: the whole path on a private, embedded set-up, in one command."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from converter.conversion.convert import Converter
from converter.conversion.image_source import open_source
from converter.conversion.inspect import inspect_image
from converter.format.errors import ConfigError, PeerpullError
from converter.registry.client import RegistryClient
from converter.registry.reference import ImageReference
from peerpull.commands.convert_cmd import print_summary
from peerpull.commands.inspect_cmd import print_table
from peerpull.commands.run_cmd import global_args, print_results
from peerpull.config import PeerpullConfig
from peerpull.testbed.oci_layout import LayerSpec, write_layout
from peerpull.testbed.registry import EmbeddedRegistry
from peerpull.testbed.runner import RunOptions, RunResult, run_image

DESCRIPTION = """\
Run the whole path on a private set-up under a temporary directory — its own Distribution
registry on 127.0.0.1 and its own containerd instance, never the host's:

  1. build a sample image (busybox, a 64 MiB "model" file, a few thousand small files),
  2. push it to the private registry and convert it with peerpull,
  3. inspect the seekable image,
  4. run the original image the usual way (containerd pull + overlayfs) and the converted one
     lazily (peerpull daemon as containerd's snapshotter, FUSE), each on a fresh private
     containerd, and print time to start, first log line and completion, and bytes by tier.

It fails (exit 1, one line naming the cause) if the converted image did not run lazily: when any
of its layers fell back to a full download (the daemon could not serve it), or if the outputs
differ. Needs root (containerd), and the packages scripts/setup.sh installs.
"""

ENTRYPOINT = ["/bin/busybox", "sh", "-c",
              "echo hello from a peerpull image; /bin/busybox sha256sum /app/pkg07/mod07.py; "
              "/bin/busybox find /app | /bin/busybox wc -l"]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("quickstart", help="build, convert, inspect and run a sample image on a private set-up",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", metavar="DIR", help="where the private registry and containerd live (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    p.set_defaults(handler=run)
    return p


def sample_image(layout: Path) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise ConfigError("/bin/busybox not found: install the busybox-static package")
    rnd = random.Random(2026)
    base = LayerSpec()
    base.add("bin", type=tarfile.DIRTYPE)
    base.add("bin/busybox", busybox.read_bytes(), mode=0o755)
    base.add("bin/sh", type=tarfile.SYMTYPE, linkname="busybox")
    app = LayerSpec()
    app.add("app", type=tarfile.DIRTYPE)
    for package in range(40):
        app.add(f"app/pkg{package:02d}", type=tarfile.DIRTYPE)
        for module in range(50):
            app.add(f"app/pkg{package:02d}/mod{module:02d}.py", f"# module {module}\nVALUE = {rnd.random()}\n".encode() * 20)
    model = LayerSpec()
    model.add("model", type=tarfile.DIRTYPE)
    model.add("model/weights.bin", rnd.randbytes(64 << 20))
    write_layout(layout, [base.tar_bytes(), app.tar_bytes(), model.tar_bytes()], cmd=ENTRYPOINT)


def _push_layout(layout: Path, ref: str) -> None:
    if shutil.which("skopeo") is None:
        raise ConfigError("skopeo not found: run scripts/setup.sh (or apt-get install skopeo)")
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{ref}"],
                   check=True, capture_output=True)


def require_lazy(result: RunResult) -> None:
    """The quickstart demonstrates lazy pulling: a lazy run that downloaded layers in full fails it."""
    if result.fallback_layers:
        raise PeerpullError(f"the converted image did not run lazily: {len(result.fallback_layers)} of {result.layers} "
                            f"layers fell back to a full download ({'; '.join(result.fallback_reasons) or 'unknown'})")


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    if os.geteuid() != 0:
        raise ConfigError("quickstart starts its own containerd and needs root")
    console = Console(width=None if sys.stdout.isatty() else 140)
    if args.work_dir and Path(args.work_dir).is_dir() and any(Path(args.work_dir).iterdir()):
        raise ConfigError(f"--work-dir {args.work_dir} is not empty (quickstart deletes it afterwards); "
                          "give a new or empty directory")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="peerpull-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        console.print(f"[bold]1/4[/] building the sample image in {work / 'layout'}")
        sample_image(work / "layout")
        with EmbeddedRegistry(work / "registry") as registry:
            original = f"{registry.address}/quickstart/app:original"
            seekable = f"{registry.address}/quickstart/app:seekable"
            _push_layout(work / "layout", original)
            console.print(f"[bold]2/4[/] converting {original}")
            async with RegistryClient(config.registry) as client:
                report = await Converter(client, config.convert).convert(
                    open_source(original, client, config.registry.platform), ImageReference.parse(seekable))
                print_summary(report, console)
                console.print("[bold]3/4[/] inspecting the seekable image")
                print_table(await inspect_image(client, open_source(seekable, client, config.registry.platform)), console)
            console.print("[bold]4/4[/] running the original normally and the converted image lazily, "
                          "each on a fresh private containerd")
            results = []
            for image, mode in ((original, "normal"), (seekable, "lazy")):
                opts = RunOptions(image, mode=mode, work_dir=str(work / f"run-{mode}"),
                                  global_args=global_args(args, config))
                results.append(await run_image(opts, config.registry, lambda text: console.print(f"  [dim]│[/] {text}")))
        print_results(results, console)
        normal, lazy = results
        require_lazy(lazy)
        ratio = normal.ready_s / lazy.ready_s if normal.ready_s and lazy.ready_s else 0.0
        console.print(f"time to completion: normal {normal.ready_s:.2f} s, lazy {lazy.ready_s:.2f} s ({ratio:.1f}x); "
                      f"registry bytes: normal {normal.registry_wire_bytes / 1e6:.1f} MB, "
                      f"lazy {lazy.registry_wire_bytes / 1e6:.1f} MB")
        same = normal.output == lazy.output and normal.exit_code == lazy.exit_code == 0
        console.print("outputs identical: " + ("yes" if same else "[red]NO[/]"))
        if not same:
            raise PeerpullError("the converted image printed something else than the original")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
