"""Cold-start benchmark: the realistic >1 GB image (Debian + a CPU PyTorch venv) from a registry
behind a rate-limited link, started normally and lazily; and FUSE vs disk sequential reads.

The registry runs in its own network namespace; its link to the host is shaped with tc (tbf rate
limit, plus netem delay where the kernel has netem) and every tc command is checked. Each run
uses a fresh private containerd and peerpull daemon (cold caches) after the page cache is
dropped. Runs, in one go:
  normal       containerd pull + overlayfs, then the container (`import torch`)
  lazy cold    peerpull pull + the peerpull snapshotter, chunks fetched on demand
  lazy peer    the same, with one peer node that warmed the image beforehand
Then one file of the image (the largest), fully cached, is read sequentially through the FUSE
mount and, as a plain file, from disk; page cache dropped before each read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realistic_image import build_realistic_image  # noqa: E402

from converter.registry.client import RegistryClient  # noqa: E402
from converter.registry.config import RegistryConfig  # noqa: E402
from peerpull.testbed.containerd import EmbeddedContainerd  # noqa: E402
from peerpull.testbed.daemon import EmbeddedDaemon  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402
from peerpull.testbed.runner import RunOptions, RunResult, run_image  # noqa: E402
from snapshotter.containerd.client import ContainerdClient  # noqa: E402
from snapshotter.containerd.pull import pull  # noqa: E402

NS = "ppbench-reg"
HOST_IF, NS_IF = "ppbr0", "ppbr1"
NS_ADDR, HOST_ADDR = "10.78.0.1", "10.78.0.254"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result


class ShapedLink:
    """A network namespace for the registry, joined to the host by a veth pair whose registry-side
    egress (the download direction) is rate-limited and, where netem exists, delayed."""

    def __init__(self, rate: str, delay_ms: float) -> None:
        self.rate, self.delay_ms = rate, delay_ms
        self.shaping = ""

    def __enter__(self) -> ShapedLink:
        self.__exit__()
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        sh("ip", "link", "set", NS_IF, "netns", NS)
        sh("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "-n", NS, "addr", "add", f"{NS_ADDR}/24", "dev", NS_IF)
        sh("ip", "-n", NS, "link", "set", NS_IF, "up")
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        tc = ["ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", NS_IF, "root"]
        netem = sh(*tc, "netem", "delay", f"{self.delay_ms}ms", "rate", self.rate, check=False) if self.delay_ms else None
        if netem is not None and netem.returncode == 0:
            self.shaping = f"netem rate {self.rate} delay {self.delay_ms} ms"
        else:
            if netem is not None:
                print(f"note: netem unavailable ({netem.stderr.strip()}): rate limit only, no added delay")
            sh(*tc, "tbf", "rate", self.rate, "burst", "256kb", "latency", "50ms")
            self.shaping = f"tbf rate {self.rate} (no delay: netem unavailable)" if self.delay_ms else f"tbf rate {self.rate}"
        shown = sh("ip", "netns", "exec", NS, "tc", "qdisc", "show", "dev", NS_IF).stdout
        if "tbf" not in shown and "netem" not in shown:
            raise SystemExit(f"shaping is not in place: {shown}")
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_rate(path: Path) -> float:
    drop_caches()
    started, total = time.monotonic(), 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1 << 20):
            total += len(block)
    return total / (time.monotonic() - started) / 1e6


def push(layout: Path, ref: str) -> None:
    sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{ref}")


async def timed_run(image: str, mode: str, registry: RegistryConfig, reg: EmbeddedRegistry, work: Path,
                    peers: list[str] | None = None) -> tuple[RunResult, int]:
    drop_caches()
    start_bytes: list[int] = []
    before = reg.blob_bytes()
    opts = RunOptions(image, mode=mode, work_dir=str(work), peers=peers or [], timeout_s=1800,
                      daemon_env={"PEERPULL_PEER_HEALTH_INTERVAL_S": "0.3"},
                      on_start=lambda: start_bytes.append(reg.blob_bytes()))
    result = await run_image(opts, registry)
    if result.exit_code != 0:
        raise SystemExit(f"{mode} run failed ({result.exit_code}): {result.output[-2000:]}")
    return result, (start_bytes[0] if start_bytes else reg.blob_bytes()) - before


async def fuse_vs_disk(image: str, registry: RegistryConfig, work: Path) -> tuple[float, float, str, int]:
    """Sequential MB/s of the image's largest file, fully cached, through FUSE vs from disk."""
    # no background prefetch in this daemon: the timed reads must not share the machine with it
    with EmbeddedDaemon(work / "fuse-daemon", extra_env={"PEERPULL_SNAPSHOTTER_PREFETCH": "file"}) as daemon:
        ctrd_root = Path(tempfile.mkdtemp(prefix="pp-bench-", dir="/run"))
        try:
            with EmbeddedContainerd(ctrd_root, proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
                async with RegistryClient(registry) as client, ContainerdClient(str(ctrd.socket), "bench") as c:
                    await pull(client, c, image, "peerpull")
                biggest = max((p for p in daemon.fuse_mount.rglob("*") if p.is_file() and not p.is_symlink()),
                              key=lambda p: p.stat().st_size)
                size = biggest.stat().st_size
                plain = work / "plain-copy.bin"
                shutil.copyfile(biggest, plain)  # first read: fetches every chunk into the cache
                await asyncio.sleep(5)  # let the file's fetch-ahead settle
                fuse = read_rate(biggest)
                disk = read_rate(plain)
                plain.unlink()
        finally:
            shutil.rmtree(ctrd_root, ignore_errors=True)
    return fuse, disk, str(biggest.relative_to(daemon.fuse_mount)).split("/", 1)[1], size


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    layout, image_bytes = build_realistic_image(Path(args.cache))
    work = Path(tempfile.mkdtemp(prefix="peerpull-coldstart-", dir="/var/tmp"))
    address = f"{NS_ADDR}:5000"
    os.environ["PEERPULL_REGISTRY_INSECURE_HOSTS"] = address  # for the daemons this starts
    os.environ["PEERPULL_PEER_TRUSTED_REGISTRIES"] = address  # the warm peer fetches from it for others
    registry = RegistryConfig(insecure_hosts=(address,))
    try:
        with ShapedLink(args.rate, args.delay_ms) as link, \
                EmbeddedRegistry(work / "registry", host=NS_ADDR, port=5000, netns=NS) as reg:
            print(f"registry at {address} behind {link.shaping}; image {image_bytes / 1e9:.2f} GB")
            original, seekable = f"{address}/bench/torch:original", f"{address}/bench/torch:seekable"
            push(layout, original)
            sh(sys.executable, "-m", "peerpull", "--log-level", "warning", "--insecure-registry", address,
               "convert", original, seekable, "--quiet")
            print("normal run …")
            normal, normal_start_bytes = await timed_run(original, "normal", registry, reg, work / "normal")
            print("lazy run, cold …")
            lazy, lazy_start_bytes = await timed_run(seekable, "lazy", registry, reg, work / "lazy")
            print("lazy run with a warm peer …")
            with EmbeddedDaemon(work / "peer", extra_env={"PEERPULL_PEER_HEALTH_INTERVAL_S": "0.3"}) as peer:
                sh(sys.executable, "-m", "peerpull", "--log-level", "warning", "--insecure-registry", address,
                   "warm", seekable, "--node", peer.peer_address)
                lazy_peer, _ = await timed_run(seekable, "lazy", registry, reg, work / "lazy-peer", [peer.peer_address])
            print("FUSE vs disk read …")
            fuse, disk, file_name, file_size = await fuse_vs_disk(seekable, registry, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures: dict[str, object] = {
        "image_bytes": image_bytes, "link": link.shaping,
        "normal_start_s": normal.start_s, "normal_first_log_s": normal.first_log_s, "normal_ready_s": normal.ready_s,
        "lazy_start_s": lazy.start_s, "lazy_first_log_s": lazy.first_log_s, "lazy_ready_s": lazy.ready_s,
        "lazy_peer_start_s": lazy_peer.start_s, "lazy_peer_first_log_s": lazy_peer.first_log_s,
        "lazy_peer_ready_s": lazy_peer.ready_s,
        "registry_bytes_before_start": lazy_start_bytes, "normal_registry_bytes_before_start": normal_start_bytes,
        "lazy_registry_bytes": lazy.registry_wire_bytes, "lazy_peer_registry_bytes": lazy_peer.registry_wire_bytes,
        "lazy_peer_bytes_from_peers": lazy_peer.bytes_by_tier.get("peer", 0.0),
        "normal_registry_bytes": normal.registry_wire_bytes,
        "fuse_read_mb_per_s": round(fuse, 1), "disk_read_mb_per_s": round(disk, 1),
        "read_file": file_name, "read_file_bytes": file_size, "output": lazy.output.strip(),
    }
    return figures


def print_table(f: dict) -> None:
    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.1f}×" if a and b else "-"

    rows = [("normal (pull + overlayfs)", f["normal_start_s"], f["normal_first_log_s"], f["normal_ready_s"],
             f["normal_registry_bytes_before_start"], f["normal_registry_bytes"]),
            ("lazy, cold cache", f["lazy_start_s"], f["lazy_first_log_s"], f["lazy_ready_s"],
             f["registry_bytes_before_start"], f["lazy_registry_bytes"]),
            ("lazy, warm peer", f["lazy_peer_start_s"], f["lazy_peer_first_log_s"], f["lazy_peer_ready_s"], None,
             f["lazy_peer_registry_bytes"])]
    print(f"\nimage {f['image_bytes'] / 1e9:.2f} GB; registry link: {f['link']}; output: {f['output']}")
    print(f"{'run':28} {'start':>8} {'1st log':>8} {'ready':>8} {'ready vs normal':>16} {'registry MB before start':>25} "
          f"{'registry MB total':>18}")
    for name, start, first, ready, before, total in rows:
        print(f"{name:28} {start:8.2f} {first if first is not None else float('nan'):8.2f} {ready:8.2f} "
              f"{ratio(f['normal_ready_s'], ready):>16} "
              f"{(before / 1e6 if before is not None else float('nan')):25.1f} {total / 1e6:18.1f}")
    print(f"\nsequential read of {f['read_file']} ({f['read_file_bytes'] / 1e6:.0f} MB), fully cached, page cache dropped:")
    print(f"  FUSE {f['fuse_read_mb_per_s']:.0f} MB/s vs disk {f['disk_read_mb_per_s']:.0f} MB/s "
          f"({f['fuse_read_mb_per_s'] / f['disk_read_mb_per_s']:.2f}×)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="1gbit", help="registry link rate, tc syntax (default 1gbit)")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="added delay where netem exists (default 5)")
    parser.add_argument("--cache", default="/var/cache/peerpull-bench", help="where the realistic image is built/kept")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, containerd, FUSE, drop_caches)")
    figures = asyncio.run(main_async(args))
    print_table(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
