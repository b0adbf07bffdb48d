"""Where the time of a lazy pull goes: `peerpull pull` of a converted 2-layer image with many
entries (default ~30,000) into a fresh daemon + containerd, `--rounds` times; prints the median
pull time, the daemon's CPU time during it, and, per layer, the daemon's `layer_lazy` breakdown (manifest, TOC fetch, TOC parse,
store, tree build). No shaped link: the registry is on loopback, so these are the CPU and round-trip
costs a link's delay adds to. Needs root (containerd, FUSE). Usage:

    .venv/bin/python bench/pull_measure.py [--files 30000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converter.registry.client import RegistryClient  # noqa: E402
from converter.registry.config import RegistryConfig  # noqa: E402
from peerpull.testbed.containerd import EmbeddedContainerd  # noqa: E402
from peerpull.testbed.daemon import EmbeddedDaemon  # noqa: E402
from peerpull.testbed.oci_layout import LayerSpec, write_layout  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402
from peerpull.testbed.runner import registry_env  # noqa: E402
from snapshotter.containerd.client import ContainerdClient  # noqa: E402
from snapshotter.containerd.pull import pull  # noqa: E402

STAGES = ("manifest_s", "toc_fetch_s", "toc_parse_s", "store_s", "tree_s", "total_s")


def layer(rnd: random.Random, prefix: str, files: int) -> bytes:
    """A layer of `files` small files in directories of 50 (a package tree: mostly small .py files)."""
    spec = LayerSpec()
    spec.add(prefix, type=tarfile.DIRTYPE)
    for d in range(0, files, 50):
        spec.add(f"{prefix}/d{d // 50:04d}", type=tarfile.DIRTYPE)
        for i in range(d, min(d + 50, files)):
            spec.add(f"{prefix}/d{d // 50:04d}/module_{i:06d}.py", rnd.randbytes(rnd.randint(0, 600)) * 3)
    return spec.tar_bytes()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (robust to a busy machine, unlike wall time)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_pull(root: Path, registry: RegistryConfig, image: str) -> tuple[float, float, list[dict]]:
    with EmbeddedDaemon(root / "daemon", extra_env=registry_env(registry)) as daemon:
        ctrd_root = Path(tempfile.mkdtemp(prefix="pp-pm-", dir="/run"))
        with EmbeddedContainerd(ctrd_root, proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
            async with RegistryClient(registry) as client, ContainerdClient(str(ctrd.socket), "bench") as c:
                cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
                report = await pull(client, c, image, "peerpull")
                seconds, cpu = time.perf_counter() - t0, cpu_seconds(daemon.pid) - cpu0
        print(f"  pull phases: {report.phases}", flush=True)
        return seconds, cpu, daemon.events("layer_lazy")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=30_000, help="entries of the two layers together")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pp-pull-measure-"))
    rnd = random.Random(1)
    layout = work / "layout"
    write_layout(layout, [layer(rnd, "usr", args.files * 2 // 3), layer(rnd, "opt", args.files // 3)])
    with EmbeddedRegistry(work / "registry") as reg:
        registry = RegistryConfig(insecure_hosts=(reg.address,))
        image = f"{reg.address}/pull/measure:1"
        subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "convert", "--quiet",
                        f"oci:{layout}:latest", image], check=True)
        times, cpus = [], []
        for i in range(args.rounds):
            seconds, cpu, layers = await one_pull(work / f"round{i}", registry, image)
            times.append(seconds)
            cpus.append(cpu)
            print(f"round {i + 1}: pull {seconds:.3f} s, daemon CPU {cpu:.2f} s; " + "; ".join(
                f"{e.get('files')} files: " + " ".join(f"{k[:-2]}={e.get(k)}" for k in STAGES) for e in layers),
                flush=True)
    print(f"median pull: {statistics.median(times):.3f} s, daemon CPU {statistics.median(cpus):.2f} s "
          f"over {len(times)} rounds ({args.files} entries)")


if __name__ == "__main__":
    asyncio.run(main())
