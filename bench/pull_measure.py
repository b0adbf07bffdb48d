"""Where the time of a lazy pull goes: `peerpull pull` of a converted 2-layer image with many
entries (default ~30,000) into a fresh daemon + containerd, `--rounds` times; prints the median
time until runnable (the pull, then a container's snapshot prepared on top of its layers, which
waits for every layer's tree), the daemon's CPU time during it, and, per layer, the daemon's `layer_lazy` breakdown (manifest, TOC fetch, TOC parse,
store, tree build). No shaped link: the registry is on loopback, so these are the CPU and round-trip
costs a link's delay adds to. Needs root (containerd, FUSE). Usage:

    .venv/bin/python bench/pull_measure.py [--files 30000] [--rounds 3]
    .venv/bin/python bench/pull_measure.py --realistic --rtt-ms 5 --before /tmp/c-before

`--realistic`: the benchmarks' PyTorch CPU image (bench/realistic_image.py, cached) instead of the
synthetic one. `--rtt-ms`: the registry behind bench/delay_relay.py on loopback (RTT/2 each way).
`--before TREE`: each round also pulls with another checkout's code (daemon and `peerpull pull`
both imported from TREE), alternating with this tree's, so both medians come from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# --worker --tree T: the pull runs with T's code (the daemon too: PYTHONPATH below)
_TREE = sys.argv[sys.argv.index("--tree") + 1] if "--tree" in sys.argv else str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, _TREE)

from converter.registry.client import RegistryClient  # noqa: E402
from converter.registry.config import RegistryConfig  # noqa: E402
from converter.registry.reference import ImageReference  # noqa: E402
from peerpull.testbed.containerd import EmbeddedContainerd  # noqa: E402
from peerpull.testbed.daemon import EmbeddedDaemon  # noqa: E402
from peerpull.testbed.oci_layout import LayerSpec, write_layout  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry, free_port  # noqa: E402
from peerpull.testbed.runner import registry_env  # noqa: E402
from snapshotter.containerd.client import ContainerdClient  # noqa: E402
from snapshotter.containerd.pull import chain_ids, pull  # noqa: E402

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


async def top_chain(client: RegistryClient, image: str) -> str:
    """The chain id of the image's top layer: the parent of a container's snapshot."""
    ref = ImageReference.parse(image)
    top, _ = await client.resolve_image(ref)
    config = json.loads(top.body)["config"]["digest"]
    return chain_ids(json.loads(await client.get_blob_bytes(ref, config))["rootfs"]["diff_ids"])[-1]


async def one_pull(root: Path, registry: RegistryConfig, image: str) -> tuple[float, float, list[dict]]:
    """(seconds until a container's snapshot could be prepared, daemon CPU seconds, layer_lazy events)."""
    env = {**registry_env(registry), "PYTHONPATH": _TREE}
    with EmbeddedDaemon(root / "daemon", extra_env=env) as daemon:
        ctrd_root = Path(tempfile.mkdtemp(prefix="pp-pm-", dir="/run"))
        with EmbeddedContainerd(ctrd_root, proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
            async with RegistryClient(registry) as client, ContainerdClient(str(ctrd.socket), "bench") as c:
                parent = await top_chain(client, image)
                cpu0, t0 = cpu_seconds(daemon.pid), time.perf_counter()
                report = await pull(client, c, image, "peerpull")
                pulled = time.perf_counter() - t0
                # runnable: a container's root file system prepared on top (waits for every layer's tree)
                await c.prepare("peerpull", "pull-measure-container", parent, {})
                seconds, cpu = time.perf_counter() - t0, cpu_seconds(daemon.pid) - cpu0
                await c.remove("peerpull", "pull-measure-container")
        print(f"  pull phases: {report.phases}; pull returned {pulled:.3f} s, container snapshot prepared "
              f"{seconds:.3f} s", file=sys.stderr, flush=True)
        return seconds, cpu, daemon.events("layer_lazy")


def worker_pull(tree: str, root: Path, address: str, image: str) -> tuple[float, float, list[dict]]:
    """One pull with `tree`'s code, in a child process (its modules, not this one's)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", tree, "--root", str(root),
                          "--address", address, "--image", image], check=True, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": tree})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["cpu"], result["layers"]


class Relay:
    """bench/delay_relay.py on loopback in front of the registry: `rtt_ms` more per round trip."""

    def __init__(self, rtt_ms: float, target: str) -> None:
        self.port = free_port("127.0.0.1")
        self._cmd = [sys.executable, str(Path(__file__).resolve().parent / "delay_relay.py"), "--listen",
                     f"127.0.0.1:{self.port}", "--target", target, "--delay-ms", str(rtt_ms / 2)]
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Relay:
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        if "relay listening" not in self._proc.stdout.readline():
            self.__exit__()
            raise SystemExit("the delay relay did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)


def summary(name: str, rounds: list[tuple[float, float, list[dict]]], entries: str) -> None:
    times, cpus = [r[0] for r in rounds], [r[1] for r in rounds]
    print(f"{name}: median pull {statistics.median(times):.3f} s (rounds: {', '.join(f'{t:.3f}' for t in times)}), "
          f"daemon CPU {statistics.median(cpus):.2f} s over {len(times)} rounds ({entries})", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=30_000, help="entries of the two layers together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--realistic", action="store_true", help="the PyTorch CPU image of bench/realistic_image.py")
    parser.add_argument("--cache", default="/var/cache/peerpull-bench", help="where the realistic image is cached")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time added in front of the registry")
    parser.add_argument("--before", default="", help="another checkout to measure in the same run (alternating)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default="", help=argparse.SUPPRESS)
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    parser.add_argument("--address", default="", help=argparse.SUPPRESS)
    parser.add_argument("--image", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        seconds, cpu, events = await one_pull(Path(args.root), RegistryConfig(insecure_hosts=(args.address,)), args.image)
        print(json.dumps({"seconds": seconds, "cpu": cpu, "layers": events}))
        return
    work = Path(tempfile.mkdtemp(prefix="pp-pull-measure-", dir="/var/tmp"))
    if args.realistic:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from realistic_image import build_realistic_image  # type: ignore[import-not-found]
        layout, _ = build_realistic_image(Path(args.cache))
        entries = "PyTorch CPU image"
    else:
        rnd = random.Random(1)
        layout = work / "layout"
        write_layout(layout, [layer(rnd, "usr", args.files * 2 // 3), layer(rnd, "opt", args.files // 3)])
        entries = f"{args.files} entries"
    try:
        with EmbeddedRegistry(work / "registry") as reg:
            address = reg.address
            image = f"{reg.address}/pull/measure:1"
            subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "--insecure-registry", address,
                            "convert", "--quiet", f"oci:{layout}:latest", image], check=True)
            relay = Relay(args.rtt_ms, address) if args.rtt_ms else None
            if relay is not None:
                relay.__enter__()
                address = f"127.0.0.1:{relay.port}"
                image = f"{address}/pull/measure:1"
            try:
                trees = [("after", str(Path(__file__).resolve().parent.parent))]
                if args.before:
                    trees.insert(0, ("before", str(Path(args.before).resolve())))
                results: dict[str, list[tuple[float, float, list[dict]]]] = {name: [] for name, _ in trees}
                for i in range(args.rounds):
                    for name, tree in trees:
                        seconds, cpu, layers = await asyncio.to_thread(worker_pull, tree, work / f"{name}{i}", address, image)
                        results[name].append((seconds, cpu, layers))
                        print(f"{name} round {i + 1}: pull {seconds:.3f} s, daemon CPU {cpu:.2f} s; " + "; ".join(
                            f"{e.get('files')} files: " + " ".join(f"{k[:-2]}={e.get(k)}" for k in STAGES) for e in layers),
                            flush=True)
            finally:
                if relay is not None:
                    relay.__exit__()
        rtt = f", RTT +{args.rtt_ms:g} ms" if args.rtt_ms else ""
        for name, _ in trees:
            summary(name, results[name], entries + rtt)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    asyncio.run(main())
