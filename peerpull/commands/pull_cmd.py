"""`peerpull pull IMAGE`: prepare an image for `ctr run --snapshotter peerpull`, lazily."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from converter.registry.client import RegistryClient
from peerpull.config import PeerpullConfig
from peerpull.progress import Progress
from peerpull.status.locality import image_locality
from peerpull.status.render import locality_line
from snapshotter.containerd.client import ContainerdClient
from snapshotter.containerd.pull import pull

DESCRIPTION = """\
Make IMAGE runnable with `ctr run --snapshotter peerpull` without downloading its seekable layers:
the manifest and config go to containerd's content store and every layer's snapshot is prepared
with the labels the peerpull daemon needs (plain `ctr images pull` passes none, so it downloads
everything). Layers that are not seekable are downloaded and unpacked as `ctr pull` would.
Needs a running `peerpull daemon` wired into containerd (see `peerpull containerd-config`).

examples:
  peerpull pull registry.local:5000/ml/vllm:seekable
  peerpull pull --address /run/containerd/containerd.sock --namespace k8s.io myimage:tag
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("pull", help="prepare an image for `ctr run --snapshotter peerpull` without downloading it",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image reference, e.g. registry:5000/repo:tag")
    p.add_argument("--address", metavar="SOCKET", help="containerd socket (default /run/containerd/containerd.sock)")
    p.add_argument("--namespace", metavar="NS", help="containerd namespace (default: default)")
    p.add_argument("--snapshotter", default=None, help="snapshotter name in containerd (default: peerpull)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run)
    return p


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    s = config.snapshotter
    quiet = args.json
    async with RegistryClient(config.registry) as registry, ContainerdClient(s.containerd_address, s.namespace) as ctrd:
        with Progress("pull_progress", f"pulling {args.image}", enabled=not quiet, image=args.image) as bar:
            report = await pull(registry, ctrd, args.image, args.snapshotter or s.name,
                                progress=None if quiet else lambda text: bar.update(text=text))
    locality = await image_locality(config, report.image) if report.lazy else None  # the daemon's view
    if args.json:
        print(json.dumps({**asdict(report), "locality": locality}, indent=2))
    else:
        print(f"{report.image}: {report.layers} layers, {report.lazy} lazy, {report.downloaded} downloaded "
              f"({report.downloaded_bytes} bytes), {report.already_present} already present, in {report.seconds:.2f} s")
        if locality is not None:
            print(locality_line(locality))
    return 0
