"""Cold-start benchmark: a realistic image (Debian + a PyTorch venv; `--large`: the CUDA build of
torch + incompressible weights) from a registry behind a rate-limited, delayed link, started
normally and lazily, in one run; medians over `--repeat` rounds.

The registry runs in its own network namespace; its link to the host is rate-limited with tc
(tbf; every tc command is checked and read back) and, with `--rtt-ms`, delayed by a TCP relay in
front of the registry (bench/delay_relay.py: this kernel has no netem); the RTT it adds is
measured and printed. Every run uses a fresh private containerd + peerpull daemon (cold caches)
after the page cache is dropped. Rows, each round:
  normal          containerd pull + overlayfs, then the container; then, on the same node with
                  the page cache dropped, the container again (second start)
  lazy cold       peerpull pull + the peerpull snapshotter; then the second start likewise
  lazy peer       the same, with one peer node that warmed the image beforehand
  read all        a container that reads every file of the image once (normal, lazy)
Once: the image's chunk count, the link's measured rate, the largest file read through FUSE vs
from disk, reads of a fully cached file through passthrough and Python vs disk (bench/fuse_reads.py,
row "fuse-reads"), and the physical limit (working-set bytes ÷ link rate; the import on a local disk).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fuse_reads  # noqa: E402
from realistic_image import build_large_image, build_realistic_image  # noqa: E402
from restart_stall import measure as measure_restart  # noqa: E402
from shaped_link import ShapedLink, sh  # noqa: E402

from converter.registry.client import RegistryClient  # noqa: E402
from converter.registry.config import RegistryConfig  # noqa: E402
from peer.metrics import by_tier  # noqa: E402
from peerpull.testbed.containerd import EmbeddedContainerd  # noqa: E402
from peerpull.testbed.daemon import EmbeddedDaemon  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402
from peerpull.testbed.runner import RunOptions, RunResult, registry_env, run_image  # noqa: E402
from snapshotter.containerd.client import ContainerdClient  # noqa: E402
from snapshotter.containerd.pull import pull  # noqa: E402

NS = "ppbench-reg"
HOST_IF, NS_IF = "ppbr0", "ppbr1"
NS_ADDR, HOST_ADDR = "10.78.0.1", "10.78.0.254"
PORT, PROBE_PORT = 5000, 5001  # the registry's address for everyone (delayed); an undelayed one to measure the RTT
DAEMON_ENV = {"PEERPULL_PEER_HEALTH_INTERVAL_S": "0.3"}
# the read-every-file container: each regular file of the image once, in 1 MiB reads
READ_ALL = ("import os, stat\n"
            "n = b = 0\n"
            "for root, dirs, files in os.walk('/'):\n"
            "    if root == '/':\n"
            "        dirs[:] = [d for d in dirs if d not in ('proc', 'sys', 'dev', 'run', 'tmp')]\n"
            "    for name in files:\n"
            "        p = os.path.join(root, name)\n"
            "        try:\n"
            "            if not stat.S_ISREG(os.lstat(p).st_mode):\n"
            "                continue\n"
            "            with open(p, 'rb', buffering=0) as f:\n"
            "                while block := f.read(1 << 20):\n"
            "                    b += len(block)\n"
            "            n += 1\n"
            "        except OSError:\n"
            "            pass\n"
            "print(n, 'files', b, 'bytes', flush=True)\n")
ROWS = ("second", "peer", "read-all", "fuse", "fuse-reads", "restart")

# the keys bench/coldstart --json always writes (tests/test_bench.py checks them)
JSON_KEYS = (
    "image", "image_bytes", "link", "rtt_ms", "rtt_measured_ms", "repeat", "image_chunks", "link_bytes_per_s",
    "pull_s", "normal_pull_s", "normal_start_s", "normal_first_log_s", "normal_ready_s",
    "lazy_pull_s", "lazy_start_s", "lazy_first_log_s", "lazy_ready_s",
    "lazy_peer_pull_s", "lazy_peer_start_s", "lazy_peer_first_log_s", "lazy_peer_ready_s",
    "normal_second_start_s", "lazy_second_start_s", "normal_second_registry_bytes", "lazy_second_registry_bytes",
    "lazy_second_registry_requests", "read_all_normal_s", "read_all_lazy_s", "read_all_normal_registry_bytes",
    "read_all_lazy_registry_bytes", "registry_bytes_before_start", "normal_registry_bytes_before_start",
    "lazy_registry_bytes", "lazy_peer_registry_bytes", "lazy_peer_bytes_from_peers", "normal_registry_bytes",
    "lazy_registry_log_bytes", "lazy_peer_registry_log_bytes",
    "lazy_daemon_cpu_s", "lazy_fuse_reads", "lazy_cpu_per_read_us", "lazy_second_cpu_per_read_us",
    "lazy_peak_rss_mb", "read_all_lazy_peak_rss_mb", "working_set_bytes", "working_set_transfer_s",
    "local_import_s", "physical_limit_s", "fuse_read_mb_per_s", "disk_read_mb_per_s", "read_file", "read_file_bytes",
    "output", "ranges", "rounds", "lazy_tier_samples",
    "fuse_random_iops", "disk_random_iops", "fuse_seq_mb_s", "disk_seq_mb_s",
    # the restart row (bench/restart_stall.py, its own small image): a reader's stall across a live restart
    "handover_max_stall_s", "crash_max_stall_s", "restart_read_errors",
)


def shaped_link(rate: str) -> ShapedLink:
    """The registry's namespace and its shaped link, at this bench's names and addresses."""
    return ShapedLink(rate, NS, HOST_IF, NS_IF, NS_ADDR, HOST_ADDR)


class Relays:
    """The delaying relay (NS_ADDR:PORT, rtt/2 each way) and an undelayed one (NS_ADDR:PROBE_PORT)
    in the registry's namespace, both in front of the registry on the namespace's loopback."""

    def __init__(self, rtt_ms: float, target_port: int) -> None:
        self.rtt_ms, self.target = rtt_ms, f"127.0.0.1:{target_port}"
        self.procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Relays:
        script = str(Path(__file__).resolve().parent / "delay_relay.py")
        for port, delay in ((PORT, self.rtt_ms / 2), (PROBE_PORT, 0.0)):
            proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, script, "--listen", f"{NS_ADDR}:{port}",
                                     "--target", self.target, "--delay-ms", str(delay)], stdout=subprocess.PIPE, text=True)
            self.procs.append(proc)
            assert proc.stdout is not None
            if "relay listening" not in proc.stdout.readline():
                self.__exit__()
                raise SystemExit("the delay relay did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def added_rtt_ms(host: str, delayed_port: int, direct_port: int, count: int = 40) -> float:
    """The round-trip time the delaying relay adds: tiny HTTP requests (GET /v2/) on kept-alive
    connections through it and through the undelayed relay, interleaved so that the machine's load
    weighs on both alike; the difference of the medians, in ms."""
    conns = [http.client.HTTPConnection(host, port, timeout=10) for port in (delayed_port, direct_port)]
    times: list[list[float]] = [[], []]
    try:
        for i in range(count + 3):
            for conn, out in zip(conns, times):
                started = time.monotonic()
                conn.request("GET", "/v2/")
                conn.getresponse().read()
                if i >= 3:  # the first ones open the connection
                    out.append((time.monotonic() - started) * 1000)
    finally:
        for conn in conns:
            conn.close()
    return statistics.median(times[0]) - statistics.median(times[1])


def link_rate(url: str, limit: int = 512 << 20) -> float:
    """Bytes per second of one blob download (its first `limit` bytes) through the link."""
    import urllib.request

    started, total = time.monotonic(), 0
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes=0-{limit - 1}"}), timeout=600) as resp:
        while block := resp.read(1 << 20):
            total += len(block)
    return total / (time.monotonic() - started)


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


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def push(layout: Path, ref: str) -> None:
    sh("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{ref}")


class Node:
    """One node of the bench: a private peerpull daemon + containerd, alive for several runs."""

    def __init__(self, work: Path, registry: RegistryConfig, peers: list[str] | None = None) -> None:
        self.work, self.registry, self.peers = work, registry, peers or []
        self.daemon = EmbeddedDaemon(work / "daemon", peers=self.peers, discovery="static" if self.peers else "none",
                                     extra_env={**registry_env(registry), **DAEMON_ENV})
        self._root = Path(tempfile.mkdtemp(prefix="pp-bench-", dir="/run"))
        self.ctrd = EmbeddedContainerd(self._root, proxy_plugins={"peerpull": str(self.daemon.socket)})

    def __enter__(self) -> Node:
        self.daemon.start()
        try:
            self.ctrd.start()
        except BaseException:
            self.daemon.close()
            raise
        deadline = time.monotonic() + 15
        while self.peers and self.metrics().get("peerpull_members", 0) < 1 + len(self.peers):
            if time.monotonic() > deadline:
                raise SystemExit("the warm peer was not reachable within 15 s")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self.ctrd.stop()
        self.daemon.close()
        # deleting GBs of snapshots takes minutes on this disk (mounted with discard): moved aside now,
        # deleted between rounds, not while the next row is measured
        trash = self.work / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        try:
            self._root.rename(trash / self._root.name)
        except OSError:
            shutil.rmtree(self._root, ignore_errors=True)

    def metrics(self) -> dict[str, float]:
        try:
            return self.daemon.metrics()
        except OSError:
            return {}

    def options(self, image: str, mode: str, args: list[str] | None = None,
                on_start: Callable[[], None] | None = None) -> RunOptions:
        return RunOptions(image, mode=mode, address=str(self.ctrd.socket), namespace="bench", args=args or [],
                          daemon_metrics=f"http://{self.daemon.peer_address}/metrics", timeout_s=3600,
                          on_start=on_start)


class Measured:
    """One timed run on a node: the runner's result plus what this bench reads around it."""

    def __init__(self, result: RunResult, log_bytes: int, log_requests: int, start_bytes: int, cpu_s: float,
                 fuse_reads: float, samples: list[dict[str, float]]) -> None:
        self.result, self.log_bytes, self.log_requests, self.start_bytes = result, log_bytes, log_requests, start_bytes
        self.cpu_s, self.fuse_reads, self.samples = cpu_s, fuse_reads, samples

    @property
    def cpu_per_read_us(self) -> float | None:
        return round(self.cpu_s / self.fuse_reads * 1e6, 1) if self.fuse_reads else None


async def _sample_tiers(node: Node, t0: float, out: list[dict[str, float]], every_s: float = 0.25) -> None:
    """Uncompressed bytes by tier as the run goes (for the plot), relative to the first sample."""
    first: dict[str, float] | None = None
    while True:
        tiers = by_tier(await asyncio.to_thread(node.metrics), "peerpull_chunk_bytes_total")
        first = first or tiers
        out.append({"t": round(time.monotonic() - t0, 3), **{k: v - first[k] for k, v in tiers.items()}})
        await asyncio.sleep(every_s)


async def timed(node: Node, reg: EmbeddedRegistry, image: str, mode: str, args: list[str] | None = None,
                sample: bool = False) -> Measured:
    drop_caches()
    start_bytes: list[int] = []
    requests0, bytes0 = reg.blob_requests()
    pid = node.daemon.pid
    cpu0, reads0 = cpu_seconds(pid), node.metrics().get("peerpull_fuse_reads_total", 0.0)
    samples: list[dict[str, float]] = []
    sampler = asyncio.create_task(_sample_tiers(node, time.monotonic(), samples)) if sample else None
    opts = node.options(image, mode, args, on_start=lambda: start_bytes.append(reg.blob_bytes()))
    try:
        result = await run_image(opts, node.registry)
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    if result.exit_code != 0:
        raise SystemExit(f"{mode} run failed ({result.exit_code}): {result.output[-2000:]}")
    requests1, bytes1 = reg.blob_requests()
    reads = node.metrics().get("peerpull_fuse_reads_total", 0.0) - reads0
    return Measured(result, bytes1 - bytes0, requests1 - requests0, (start_bytes[0] if start_bytes else bytes1) - bytes0,
                    cpu_seconds(pid) - cpu0, reads, samples)


def _times(prefix: str, r: RunResult) -> dict[str, Any]:
    return {f"{prefix}_pull_s": r.pull_s, f"{prefix}_start_s": r.start_s, f"{prefix}_first_log_s": r.first_log_s,
            f"{prefix}_ready_s": r.ready_s}


def _second(mode: str, m: Measured) -> dict[str, Any]:
    """A second start's figures: `<mode>_second_start_s` is its time to ready (the row's figure);
    its container start is `<mode>_second_container_start_s`."""
    p = f"{mode}_second"
    return {f"{p}_start_s": m.result.ready_s, f"{p}_ready_s": m.result.ready_s, f"{p}_pull_s": m.result.pull_s,
            f"{p}_container_start_s": m.result.start_s, f"{p}_first_log_s": m.result.first_log_s,
            f"{p}_registry_bytes": m.log_bytes, f"{p}_registry_requests": m.log_requests,
            f"{p}_cpu_per_read_us": m.cpu_per_read_us}


async def one_round(original: str, seekable: str, registry: RegistryConfig, reg: EmbeddedRegistry, work: Path,
                    skip: set[str], address: str) -> dict[str, Any]:
    """Every row once, each on fresh nodes; the figures of this round."""
    f: dict[str, Any] = {}
    print("normal run …", flush=True)
    with Node(work / "normal", registry) as node:
        normal = await timed(node, reg, original, "normal")
        if "second" not in skip:
            print("normal, second start …", flush=True)
            second = await timed(node, reg, original, "normal")
            f.update(_second("normal", second))
    f.update(_times("normal", normal.result))
    f.update({"normal_registry_bytes_before_start": normal.start_bytes, "normal_registry_bytes": normal.log_bytes})
    print("lazy run, cold …", flush=True)
    with Node(work / "lazy", registry) as node:
        lazy = await timed(node, reg, seekable, "lazy", sample=True)
        f["lazy_peak_rss_mb"] = round(peak_rss_mb(node.daemon.pid), 1)
        if "second" not in skip:
            print("lazy, second start …", flush=True)
            second = await timed(node, reg, seekable, "lazy")
            f.update(_second("lazy", second))
    f.update(_times("lazy", lazy.result))
    f.update({"registry_bytes_before_start": lazy.start_bytes, "lazy_registry_bytes": lazy.result.registry_wire_bytes,
              "lazy_registry_log_bytes": lazy.log_bytes, "lazy_daemon_cpu_s": round(lazy.cpu_s, 2),
              "lazy_fuse_reads": lazy.fuse_reads, "lazy_cpu_per_read_us": lazy.cpu_per_read_us,
              "lazy_tier_samples": lazy.samples, "output": lazy.result.output.strip()})
    if "peer" not in skip:
        print("lazy run with a warm peer …", flush=True)
        with EmbeddedDaemon(work / "peer", extra_env={**registry_env(registry), **DAEMON_ENV}) as peer:
            sh(sys.executable, "-m", "peerpull", "--log-level", "warning", "--insecure-registry", address,
               "warm", seekable, "--node", peer.peer_address)
            with Node(work / "lazy-peer", registry, [peer.peer_address]) as node:
                warm = await timed(node, reg, seekable, "lazy")
        f.update(_times("lazy_peer", warm.result))
        f.update({"lazy_peer_registry_bytes": warm.result.registry_wire_bytes,
                  "lazy_peer_registry_log_bytes": warm.log_bytes,
                  "lazy_peer_bytes_from_peers": warm.result.bytes_by_tier.get("peer", 0.0)})
    if "read-all" not in skip:
        args = ["/opt/venv/bin/python", "-c", READ_ALL]
        print("read every file, normal …", flush=True)
        with Node(work / "read-normal", registry) as node:
            read_normal = await timed(node, reg, original, "normal", args)
        print("read every file, lazy …", flush=True)
        with Node(work / "read-lazy", registry) as node:
            read_lazy = await timed(node, reg, seekable, "lazy", args)
            f["read_all_lazy_peak_rss_mb"] = round(peak_rss_mb(node.daemon.pid), 1)
        f.update({"read_all_normal_s": read_normal.result.ready_s, "read_all_lazy_s": read_lazy.result.ready_s,
                  "read_all_normal_registry_bytes": read_normal.log_bytes,
                  "read_all_lazy_registry_bytes": read_lazy.log_bytes, "read_all_output": read_lazy.result.output.strip()})
    return f


async def fuse_vs_disk(image: str, registry: RegistryConfig, work: Path) -> tuple[float, float, str, int]:
    """Sequential MB/s of the image's largest file, fully cached, through FUSE vs from disk."""
    # no background prefetch in this daemon: the timed reads must not share the machine with it
    with EmbeddedDaemon(work / "fuse-daemon", extra_env={**registry_env(registry),
                                                         "PEERPULL_SNAPSHOTTER_PREFETCH": "file"}) as daemon:
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


def image_chunks(ref: str, address: str) -> int:
    """Frames of a seekable image — what a node fetches (format 2 packs small files, so fewer than
    the file chunks) — from `peerpull inspect --json`."""
    out = sh(sys.executable, "-m", "peerpull", "--log-level", "warning", "--insecure-registry", address,
             "inspect", ref, "--json").stdout
    return sum(int(layer.get("frames") or layer.get("chunks") or 0) for layer in json.loads(out)["layers"])


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the rounds' numbers, with their [min, max] in `ranges`; other values from round 1."""
    out: dict[str, Any] = {}
    ranges: dict[str, list[float]] = {}
    for key in rounds[0]:
        values = [r.get(key) for r in rounds]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers and len(numbers) == len(values):
            median = statistics.median(numbers)
            out[key] = round(median, 3) if isinstance(median, float) else median
            ranges[key] = [min(numbers), max(numbers)]
        else:
            out[key] = values[0]
    out["ranges"] = ranges
    return out


@asynccontextmanager
async def registry_link(args: argparse.Namespace, work: Path) -> AsyncIterator[tuple[EmbeddedRegistry, ShapedLink, float | None]]:
    """The shaped link, the relays when --rtt-ms, and the registry behind them; the measured RTT."""
    with shaped_link(args.rate) as link:
        if not args.rtt_ms:
            with EmbeddedRegistry(work / "registry", host=NS_ADDR, port=PORT, netns=NS) as reg:
                yield reg, link, None
            return
        with Relays(args.rtt_ms, PORT), EmbeddedRegistry(work / "registry", host="127.0.0.1", port=PORT, netns=NS,
                                                         probe_url=f"http://{NS_ADDR}:{PORT}") as reg:
            yield reg, link, round(await asyncio.to_thread(added_rtt_ms, NS_ADDR, PORT, PROBE_PORT), 2)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.large:
        layout, image_bytes = build_large_image(Path(args.cache) / "large", args.weights_mib)
        label = f"Debian + CUDA torch 2.14.1 + {args.weights_mib} MiB weights"
    else:
        layout, image_bytes = build_realistic_image(Path(args.cache))
        label = "Debian + CPU torch 2.13.0"
    if args.layout:
        label += ", startup-first layout (convert --profile learn)"
    work = Path(tempfile.mkdtemp(prefix="peerpull-coldstart-", dir="/var/tmp"))
    address = f"{NS_ADDR}:{PORT}"
    os.environ["PEERPULL_REGISTRY_INSECURE_HOSTS"] = address  # for the daemons this starts
    os.environ["PEERPULL_PEER_TRUSTED_REGISTRIES"] = address  # the warm peer fetches from it for others
    registry = RegistryConfig(insecure_hosts=(address,))
    skip = set(args.skip)
    name = "bench/large" if args.large else "bench/torch"
    try:
        async with registry_link(args, work) as (reg, link, rtt):
            shaping = link.shaping + (f", relay RTT +{args.rtt_ms:g} ms (measured {rtt} ms)" if rtt is not None else "")
            print(f"registry at {address} behind {shaping}; image {label}, {image_bytes / 1e9:.2f} GB", flush=True)
            original, seekable = f"{address}/{name}:original", f"{address}/{name}:seekable"
            push(layout, original)
            # --layout: the startup-first layout, learnt by running the entrypoint once on an embedded set-up
            layout_args = ["--profile", "learn"] if args.layout else []
            sh(sys.executable, "-m", "peerpull", "--log-level", "warning", "--insecure-registry", address,
               "convert", original, seekable, "--quiet", *layout_args)
            chunks = image_chunks(seekable, address)
            manifest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"].split(":")[1]
            layers = json.loads((layout / "blobs" / "sha256" / manifest).read_text())["layers"]
            biggest = max(layers, key=lambda d: d["size"])["digest"]
            rate = await asyncio.to_thread(link_rate, f"http://{address}/v2/{name}/blobs/{biggest}")
            print(f"link: {rate / 1e6:.0f} MB/s measured; image: {chunks} frames", flush=True)
            rounds = []
            for i in range(args.repeat):
                print(f"round {i + 1} of {args.repeat}", flush=True)
                rounds.append(await one_round(original, seekable, registry, reg, work / f"round-{i}", skip, address))
                await asyncio.to_thread(shutil.rmtree, work / f"round-{i}", True)  # caches and containerd roots
            fuse = disk = 0.0
            file_name, file_size = "", 0
            if "fuse" not in skip:
                print("FUSE vs disk read …", flush=True)
                fuse, disk, file_name, file_size = await fuse_vs_disk(seekable, registry, work)
            reads: dict[str, Any] = {}
            if "fuse-reads" not in skip:
                print("FUSE reads of a cached file: passthrough, Python, disk …", flush=True)
                reads = await asyncio.to_thread(fuse_reads.measure, work / "fuse-reads", 512, 20000, 3)
            restart: dict[str, Any] | None = None
            if "restart" not in skip:
                print("reader stall across a live restart …", flush=True)
                restart = await asyncio.to_thread(measure_restart, work / "restart", args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return summarize(rounds, label=label, image_bytes=image_bytes, link=shaping, rtt_ms=args.rtt_ms, rtt_measured_ms=rtt,
                     chunks=chunks, rate=rate, fuse=(fuse, disk, file_name, file_size), reads=reads,
                     restart=restart)


def summarize(rounds: list[dict[str, Any]], *, label: str, image_bytes: int, link: str, rtt_ms: float,
              rtt_measured_ms: float | None, chunks: int, rate: float,
              fuse: tuple[float, float, str, int] = (0.0, 0.0, "", 0),
              reads: dict[str, Any] | None = None,
              restart: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON figures: the rounds' medians and ranges, the once-per-run figures and the
    physical limit; every key of JSON_KEYS (None for rows left out)."""
    f = combine(rounds)
    f["rounds"] = rounds
    working_set = f.get("lazy_registry_log_bytes") or 0
    local = f.get("normal_second_start_s")
    transfer = working_set / rate if rate else None
    f.update({"image": label, "image_bytes": image_bytes, "link": link, "rtt_ms": rtt_ms,
              "rtt_measured_ms": rtt_measured_ms, "repeat": len(rounds), "image_chunks": chunks,
              "link_bytes_per_s": round(rate), "pull_s": f.get("lazy_pull_s"), "working_set_bytes": working_set,
              "working_set_transfer_s": round(transfer, 2) if transfer is not None else None, "local_import_s": local,
              "physical_limit_s": round(max(transfer, local), 2) if transfer is not None and local is not None else None,
              "fuse_read_mb_per_s": round(fuse[0], 1), "disk_read_mb_per_s": round(fuse[1], 1),
              "read_file": fuse[2], "read_file_bytes": fuse[3]})
    f.update(reads or {})  # bench/fuse_reads.py's figures
    if restart is not None:
        f.update({k: restart[k] for k in ("handover_max_stall_s", "crash_max_stall_s", "restart_read_errors",
                                          "quiet_max_read_s", "restart_stalls")})
    for key in JSON_KEYS:
        f.setdefault(key, None)  # rows left out with --skip
    return f


def _s(f: dict[str, Any], key: str) -> str:
    """A median with its range, e.g. `9.20 s (8.9–9.6)`."""
    value = f.get(key)
    if value is None:
        return "–"
    low, high = f.get("ranges", {}).get(key, [value, value])
    return f"{value:.2f} s" + (f" ({low:.2f}–{high:.2f})" if f.get("repeat", 1) > 1 else "")


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.1f} MB"


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def table(f: dict[str, Any]) -> str:
    """The figures as a Markdown table (what docs/benchmarks.md shows)."""
    large = f["image"].startswith("Debian + CUDA")
    first, ready = ("first log line (import done)", "ready (weights read)") if large else ("first log line", "ready (import done)")
    lines = [f"image: {f['image']}, {f['image_bytes'] / 1e9:.2f} GB, {f['image_chunks']} frames (chunks fetched); link: {f['link']}, "
             f"{f['link_bytes_per_s'] / 1e6:.0f} MB/s measured; medians of {f['repeat']}; output: {f['output']}", "",
             f"| run | pull until runnable | container start | {first} | {ready} | ready vs normal "
             "| registry bytes before start | registry bytes total |", "|---|---|---|---|---|---|---|---|"]
    rows = [("normal (ctr pull + overlayfs)", "normal", f["normal_registry_bytes_before_start"], f["normal_registry_bytes"]),
            ("lazy, cold node", "lazy", f["registry_bytes_before_start"], f["lazy_registry_log_bytes"]),
            ("lazy, warm peer", "lazy_peer", None, f["lazy_peer_registry_log_bytes"]),
            ("normal, second start (same node)", "normal_second", None, f["normal_second_registry_bytes"]),
            ("lazy, second start (same node)", "lazy_second", None, f["lazy_second_registry_bytes"])]
    for name, p, before, total in rows:
        if f.get(f"{p}_ready_s") is None:
            continue
        started = p + ("_container_start_s" if p.endswith("_second") else "_start_s")
        lines.append(f"| {name} | {_s(f, p + '_pull_s')} | {_s(f, started)} | {_s(f, p + '_first_log_s')} "
                     f"| {_s(f, p + '_ready_s')} | {_x(f['normal_ready_s'], f[p + '_ready_s'])} | {_mb(before)} | {_mb(total)} |")
    if f.get("read_all_lazy_s") is not None:
        lines.append(f"| read every file, normal | | | | {_s(f, 'read_all_normal_s')} | 1.00× | | "
                     f"{_mb(f['read_all_normal_registry_bytes'])} |")
        lines.append(f"| read every file, lazy | | | | {_s(f, 'read_all_lazy_s')} | "
                     f"{_x(f['read_all_normal_s'], f['read_all_lazy_s'])} | | {_mb(f['read_all_lazy_registry_bytes'])} |")
    lines += ["",
              f"* lazy second start sent {f.get('lazy_second_registry_requests') or 0:.0f} blob requests "
              f"({_mb(f.get('lazy_second_registry_bytes'))}) to the registry",
              f"* daemon CPU per FUSE read: {f['lazy_cpu_per_read_us']} µs cold ({f['lazy_daemon_cpu_s']} s over "
              f"{f['lazy_fuse_reads'] or 0:.0f} reads), {f.get('lazy_second_cpu_per_read_us')} µs on the second start",
              f"* daemon peak RSS: {f['lazy_peak_rss_mb']} MB cold start, {f.get('read_all_lazy_peak_rss_mb')} MB read-every-file",
              f"* physical limit: working set {_mb(f['working_set_bytes'])} (registry bytes of the cold lazy run) ÷ "
              f"{f['link_bytes_per_s'] / 1e6:.0f} MB/s = {f['working_set_transfer_s']} s; the same start on a local disk "
              f"(normal, second start) {f['local_import_s']} s; limit ≈ {f['physical_limit_s']} s "
              f"(lazy cold is {_x(f['lazy_ready_s'], f['physical_limit_s'])} of it)"]
    if f.get("read_file"):
        lines.append(f"* sequential read of {f['read_file']} ({f['read_file_bytes'] / 1e6:.0f} MB), fully cached, page "
                     f"cache dropped: FUSE {f['fuse_read_mb_per_s']:.0f} MB/s vs disk {f['disk_read_mb_per_s']:.0f} MB/s "
                     f"({_x(f['fuse_read_mb_per_s'], f['disk_read_mb_per_s'])})")
    if f.get("fuse_random_iops"):
        lines.append(f"* fully cached {f['fuse_reads_file_bytes'] >> 20} MiB file, page cache dropped, passthrough vs "
                     f"disk: sequential {f['fuse_seq_mb_s']:.0f} vs {f['disk_seq_mb_s']:.0f} MB/s ({f['fuse_seq_ratio']:.2f}×), "
                     f"4 KiB random {f['fuse_random_iops']} vs {f['disk_random_iops']} reads/s ({f['fuse_random_ratio']:.2f}×); "
                     f"served by Python {f['python_seq_ratio']:.2f}× / {f['python_random_ratio']:.2f}×, "
                     f"{f['python_cpu_us_per_read']} µs daemon CPU per READ")
    if f.get("handover_max_stall_s") is not None:
        quiet = f.get("quiet_max_read_s")
        lines.append(f"* live restart (own small image, a reader on the mount): longest read across a planned handover "
                     f"{f['handover_max_stall_s']:.2f} s, across a crash {f['crash_max_stall_s']:.2f} s "
                     f"(quiet window {quiet:.3f} s: {_x(f['handover_max_stall_s'], quiet)} / "
                     f"{_x(f['crash_max_stall_s'], quiet)}); read errors {f['restart_read_errors']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="1gbit", help="registry link rate, tc syntax (default 1gbit)")
    parser.add_argument("--rtt-ms", type=float, default=5.0,
                        help="round-trip time added by a delaying relay in front of the registry (default 5; 0: none)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every row; medians and ranges (default 3)")
    parser.add_argument("--large", action="store_true",
                        help="the 8 GB class image: CUDA torch 2.14.1 + weights read whole after the import")
    parser.add_argument("--weights-mib", type=int, default=2048, help="--large: size of the weights file (default 2048)")
    parser.add_argument("--layout", action="store_true",
                        help="convert with --profile learn: startup files first, the learnt profile pushed beside it")
    parser.add_argument("--skip", action="append", default=[], choices=ROWS, help="leave a row out (repeatable)")
    parser.add_argument("--cache", default="/var/cache/peerpull-bench", help="where the images are built/kept")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="write a timeline per mode (needs the bench extra: matplotlib)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, containerd, FUSE, drop_caches)")
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    figures = asyncio.run(main_async(args))
    print("\n" + table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if args.plot:
        from plot import plot_figures

        plot_figures(figures, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
