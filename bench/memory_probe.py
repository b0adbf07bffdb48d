"""Peak resident memory of the node daemon: a cold start and a container that reads every file of
the realistic image (Debian + the PyTorch CPU venv), each on a fresh node, in one run; with
`--before TREE` the same rows with the daemon's code taken from another checkout (an unchanged
tree, e.g. `git worktree add /tmp/before <commit>`), so before and after share the machine's state.

The registry is on loopback (the fastest link makes the most bytes arrive per second), or with
`--rate` in a network namespace of its own (`ppmem-<net-id>`) behind a tbf-shaped link. The daemon's VmRSS is sampled every `--every-s` from /proc/<pid>/status while
the container runs; VmHWM is its peak. The daemon's own `peerpull_memory_bytes{holder}` and
`peerpull_resident_bytes` gauges are read at the same time, when it has them.

    bench/memory_probe.py [--before /tmp/before] [--rate 1gbit --net-id d] [--json FILE] [--cache DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coldstart_bench import READ_ALL, Node, push  # noqa: E402
from realistic_image import build_realistic_image  # noqa: E402
from shaped_link import ShapedLink  # noqa: E402

from converter.registry.config import RegistryConfig  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402
from peerpull.testbed.runner import run_image  # noqa: E402

ROWS = ("cold", "read_all")


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of `pid` in MB (0 once it is gone)."""
    out = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


async def _sample(node: Node, pid: int, every_s: float, out: dict[str, Any]) -> None:
    while True:
        status = proc_status(pid)
        out["rss_max_mb"] = max(out.get("rss_max_mb", 0.0), status["VmRSS"])
        metrics = await asyncio.to_thread(node.metrics)
        for key, value in metrics.items():
            if key.startswith("peerpull_memory_bytes") or key == "peerpull_resident_bytes":
                out.setdefault("gauges_max", {})[key] = max(out.get("gauges_max", {}).get(key, 0.0), value)
        await asyncio.sleep(every_s)


async def one_row(row: str, tree: Path, image: str, registry: RegistryConfig, work: Path,
                  every_s: float) -> dict[str, Any]:
    """One container on a fresh node whose daemon runs `tree`'s code; its peak RSS figures."""
    env = {"PYTHONPATH": str(tree)}  # before the installed (editable) tree on the daemon's path
    node = Node(work, registry)
    node.daemon._env.update(env)  # the bench's Node builds the daemon; only its code differs here
    out: dict[str, Any] = {}
    with node:
        pid = node.daemon.pid
        assert pid is not None
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        sampler = asyncio.create_task(_sample(node, pid, every_s, out))
        args = ["/opt/venv/bin/python", "-c", READ_ALL] if row == "read_all" else []
        started = time.monotonic()
        try:
            result = await run_image(node.options(image, "lazy", args), registry)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        if result.exit_code != 0:
            raise SystemExit(f"{row} run failed ({result.exit_code}): {result.output[-2000:]}")
        out["code"] = subprocess.run([sys.executable, "-c", "import peer; print(peer.__file__)"], cwd=work, env={
            **os.environ, **env}, capture_output=True, text=True).stdout.strip()  # which tree the daemon ran
        out.update({"seconds": round(time.monotonic() - started, 2), "peak_rss_mb": round(proc_status(pid)["VmHWM"], 1),
                    "registry_wire_bytes": result.registry_wire_bytes, "output": result.output.strip()[-200:]})
        out["rss_max_mb"] = round(out.get("rss_max_mb", 0.0), 1)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    layout, image_bytes = build_realistic_image(Path(args.cache))
    here = Path(__file__).resolve().parent.parent
    trees = {"after": here} | ({"before": Path(args.before).resolve()} if args.before else {})
    work = Path(tempfile.mkdtemp(prefix="peerpull-memory-", dir="/var/tmp"))
    os.chdir(work)  # the daemons' `python -m` puts their working directory first on their path: not a tree
    results: dict[str, Any] = {"image_bytes": image_bytes, "rows": {}}
    try:
        with contextlib.ExitStack() as stack:
            if args.rate:  # the registry in a namespace of its own behind a tbf-shaped veth pair
                net = f"10.213.{ord(args.net_id[0]) % 256}"
                stack.enter_context(ShapedLink(args.rate, f"ppmem-{args.net_id}", f"ppm{args.net_id}0",
                                               f"ppm{args.net_id}1", f"{net}.1", f"{net}.254"))
                reg = stack.enter_context(EmbeddedRegistry(work / "registry", host=f"{net}.1", port=5000,
                                                           netns=f"ppmem-{args.net_id}"))
            else:
                reg = stack.enter_context(EmbeddedRegistry(work / "registry"))
            results["link"] = f"tbf rate {args.rate}" if args.rate else "loopback"
            os.environ["PEERPULL_REGISTRY_INSECURE_HOSTS"] = reg.address
            registry = RegistryConfig(insecure_hosts=(reg.address,))
            original, seekable = f"{reg.address}/bench/torch:original", f"{reg.address}/bench/torch:seekable"
            push(layout, original)
            subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "--insecure-registry",
                            reg.address, "convert", original, seekable, "--quiet"], check=True)
            for round_ in range(args.repeat):
                for name, tree in sorted(trees.items(), key=lambda kv: (kv[0] != "before", round_ % 2)):
                    for row in ROWS:
                        print(f"round {round_ + 1}: {name} {row} …", flush=True)
                        got = await one_row(row, tree, seekable, registry, work / f"{name}-{row}-{round_}", args.every_s)
                        results["rows"].setdefault(name, {}).setdefault(row, []).append(got)
                        print(f"  peak RSS {got['peak_rss_mb']} MB in {got['seconds']} s ({got['code']}); "
                              f"gauges {got.get('gauges_max')}",
                              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| daemon | cold start peak RSS (MB) | read-every-file peak RSS (MB) |", "|---|---|---|"]
    for name, rows in sorted(results["rows"].items(), reverse=True):
        cells = [", ".join(str(r["peak_rss_mb"]) for r in rows.get(row, [])) for row in ROWS]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="TREE", help="a checkout whose daemon code is measured too")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every row (default 1)")
    parser.add_argument("--rate", help="shape the registry's link (tc syntax, e.g. 1gbit); default: loopback")
    parser.add_argument("--net-id", default="d", help="names the --rate network namespace (ppmem-ID): one per user")
    parser.add_argument("--every-s", type=float, default=0.1, help="sampling interval (default 0.1 s)")
    parser.add_argument("--cache", default="/var/cache/peerpull-bench", help="where the image is built/kept")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
