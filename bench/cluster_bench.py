"""Cluster benchmark: N real nodes cold-start the same container at the same instant (issue 12,
item 1), and, with `--warm`, warm the image across the cluster, each node fetching its own ring
share from the registry (item 4).

Each node is a network namespace with its own containerd and `peerpull daemon` (static peer
list); the registry has a namespace of its own. All are joined by a bridge, every link shaped
with tc tbf in both directions (bench/cluster_net.py). For every N (fresh nodes, cold caches):
  cold start   all N pull + run the same container at once (one barrier); per node: time to
               ready (completion of the container, from the pull's start), its output checked;
               registry egress (layer-blob bytes in the registry's access log) ÷ what one node
               alone needs (the N=1 run of the same invocation, always run first); bytes each
               node uploaded (its link's tx counter and the frames it served to peers)
  warm         `peerpull warm IMAGE --node … --node …` on all N at once; time until every node
               holds every chunk; egress ÷ the image's layer blobs; the time the split predicts,
               image ÷ (N × node link) + one share ÷ node link
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster_net import ClusterNet, Link  # noqa: E402

from converter.registry.client import RegistryClient  # noqa: E402
from converter.registry.config import RegistryConfig  # noqa: E402
from converter.registry.manifest import parse_manifest  # noqa: E402
from converter.registry.reference import ImageReference  # noqa: E402
from peer.metrics import by_tier  # noqa: E402
from peerpull.testbed.containerd import EmbeddedContainerd  # noqa: E402
from peerpull.testbed.daemon import EmbeddedDaemon  # noqa: E402
from peerpull.testbed.oci_layout import LayerSpec, write_layout  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402
from peerpull.testbed.runner import RunOptions, registry_env, run_image  # noqa: E402

PEER_PORT, REGISTRY_PORT = 7470, 5000
TOKEN = "p4-cluster-bench"
BUSYBOX = Path("/bin/busybox")  # static: the small image needs no libc
SMALL_CMD = ["/bin/sh", "-c", "cat /data/* | sha256sum"]
BENCH_LOCK = "/var/cache/peerpull-bench.lock"
_BLOB_GET = re.compile(r'"GET /v2/(?P<repo>.+?)/blobs/(?P<digest>sha256:[0-9a-f]{64}) HTTP/[0-9.]+" '
                       r'(?P<status>\d{3}) (?P<bytes>\d+)')
# the keys every --json record has (tests/test_cluster_start.py checks them); records also carry
# "mode": "cold" (one per N, N=1 first) or "warm" (one per N and split setting)
JSON_KEYS = ("nodes", "egress_ratio", "p50_ready_s", "max_ready_s")


def build_small_image(layout: Path, data_bytes: int, files: int = 8, seed: int = 12) -> str:
    """busybox + `files` incompressible files under /data; the container prints the sha256 of
    them all (returned: the output every node must print)."""
    rnd = random.Random(seed)
    base = LayerSpec()
    base.add("bin", type=tarfile.DIRTYPE)
    base.add("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in ("sh", "cat", "sha256sum"):
        base.add(f"bin/{applet}", type=tarfile.SYMTYPE, linkname="busybox")
    base.add("tmp", type=tarfile.DIRTYPE, mode=0o1777)
    data = LayerSpec()
    data.add("data", type=tarfile.DIRTYPE)
    digest = hashlib.sha256()
    for i in range(files):
        blob = rnd.randbytes(data_bytes // files)
        data.add(f"data/f{i:03d}.bin", blob)
        digest.update(blob)
    write_layout(layout, [base.tar_bytes(), data.tar_bytes()], cmd=SMALL_CMD, env=["PATH=/bin"])
    return f"{digest.hexdigest()}  -"


def registry_blob_bytes(log_path: Path, digests: set[str]) -> int:
    """Bytes the registry sent for these blobs so far (its access log: 200 and 206 answers)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return 0
    return sum(int(m["bytes"]) for m in _BLOB_GET.finditer(text)
               if m["digest"] in digests and m["status"] in ("200", "206"))


@dataclass
class Node:
    """One node: a daemon and a containerd in the namespace of `link`."""

    index: int
    link: Link
    work: Path
    peers: list[str]
    env: dict[str, str]
    daemon: EmbeddedDaemon | None = None
    ctrd: EmbeddedContainerd | None = None
    ctrd_root: Path | None = None

    @property
    def address(self) -> str:
        return f"{self.link.address}:{PEER_PORT}"

    def start(self) -> Node:
        self.daemon = EmbeddedDaemon(self.work / "daemon", host=self.link.address, port=PEER_PORT, discovery="static",
                                     peers=self.peers, extra_env=self.env, netns=self.link.ns,
                                     node_id=f"p4-node{self.index}")
        self.daemon.start(timeout_s=90)
        self.ctrd_root = Path(tempfile.mkdtemp(prefix="p4-ctrd-", dir="/run"))  # short socket paths
        self.ctrd = EmbeddedContainerd(self.ctrd_root, proxy_plugins={"peerpull": str(self.daemon.socket)},
                                       netns=self.link.ns)
        self.ctrd.start(timeout_s=90)
        return self

    def stop(self) -> None:
        if self.ctrd is not None:
            self.ctrd.stop()
        if self.daemon is not None:
            self.daemon.close()
        if self.ctrd_root is not None:
            shutil.rmtree(self.ctrd_root, ignore_errors=True)

    def metrics(self) -> dict[str, float]:
        assert self.daemon is not None
        return self.daemon.metrics()


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process so far (/proc/PID/stat)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine so far (/proc/stat): other work included."""
    values = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class Snapshot:
    """A node's counters at one moment."""

    metrics: dict[str, float]
    tx: int
    rx: int
    cpu_s: float

    @classmethod
    def of(cls, node: Node) -> Snapshot:
        tx, rx = node.link.counters()
        return cls(node.metrics(), tx, rx, cpu_seconds(node.daemon.pid if node.daemon else None))

    def delta(self, later: Snapshot) -> dict[str, Any]:
        wire0, wire1 = (by_tier(s.metrics, "peerpull_chunk_wire_bytes_total") for s in (self, later))
        served = later.metrics.get("peerpull_served_bytes_total", 0.0) - self.metrics.get("peerpull_served_bytes_total", 0.0)
        return {"link_tx_bytes": later.tx - self.tx, "link_rx_bytes": later.rx - self.rx,
                "daemon_cpu_s": round(later.cpu_s - self.cpu_s, 2),
                "served_bytes": int(served), "from_origin_bytes": int(wire1["origin"] - wire0["origin"]),
                "from_peers_bytes": int(wire1["peer"] - wire0["peer"])}


@dataclass
class Cluster:
    """N started nodes, each knowing the others (static peers), all seeing N members."""

    net: ClusterNet
    count: int
    work: Path
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    def __enter__(self) -> Cluster:
        links = self.net.links[:self.count]
        addresses = [f"{link.address}:{PEER_PORT}" for link in links]
        self.nodes = [Node(i, link, self.work / f"node{i}", [a for a in addresses if a != addresses[i]], self.env)
                      for i, link in enumerate(links)]
        try:
            with ThreadPoolExecutor(self.count) as pool:
                list(pool.map(Node.start, self.nodes))
            self.wait_members()
        except BaseException:
            self.__exit__()
            raise
        return self

    def wait_members(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(n.metrics().get("peerpull_members", 0) >= self.count for n in self.nodes):
                return
            time.sleep(0.2)
        seen = [n.metrics().get("peerpull_members", 0) for n in self.nodes]
        raise RuntimeError(f"the nodes did not all see {self.count} members within {timeout_s:.0f} s: {seen}")

    def __exit__(self, *exc: object) -> None:
        with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
            list(pool.map(Node.stop, self.nodes))
        shutil.rmtree(self.work, ignore_errors=True)


@dataclass
class Setup:
    """The network, the registry behind its link and the image pushed and converted."""

    net: ClusterNet
    registry: EmbeddedRegistry
    image: str  # the seekable image's reference
    layer_digests: set[str]
    image_bytes: int  # the seekable layer blobs, in all
    expected_output: str | None  # what every node's container prints (None: the exit code alone is checked)
    registry_config: RegistryConfig
    work: Path

    def node_env(self) -> dict[str, str]:
        address = self.registry.address
        # no profile pushed to the registry: every run is the image's first start anywhere, so a
        # later N does not start from the profile an earlier run recorded (the baseline would not compare)
        return {**registry_env(self.registry_config), "PEERPULL_PEER_TOKEN": TOKEN,
                "PEERPULL_PEER_TRUSTED_REGISTRIES": address, "PEERPULL_PEER_HEALTH_INTERVAL_S": "0.3",
                "PEERPULL_SNAPSHOTTER_PROFILE_PUSH": "false"}

    def egress(self) -> int:
        return registry_blob_bytes(self.registry.log_path, self.layer_digests)


def peerpull_cli(*args: str, registry: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "peerpull", "--log-level", "warning", "--insecure-registry", registry, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"peerpull {args[0]} failed ({result.returncode}): {result.stderr.strip()[-1500:]}")
    return result


async def _layers(image: str, config: RegistryConfig) -> tuple[set[str], int]:
    ref = ImageReference.parse(image)
    async with RegistryClient(config) as client:
        fetched, _ = await client.resolve_image(ref)
    manifest = parse_manifest(fetched.body, fetched.media_type, str(ref))
    return {d["digest"] for d in manifest["layers"]}, sum(int(d["size"]) for d in manifest["layers"])


def prepare(stack: ExitStack, net: ClusterNet, work: Path, image: str, data_mib: int, cache: Path,
            chunk_size: int | None = None) -> Setup:
    """Registry up in its namespace, the image pushed (skopeo) and converted (peerpull convert)."""
    assert net.registry is not None
    registry = stack.enter_context(EmbeddedRegistry(work / "registry", host=net.registry.address, port=REGISTRY_PORT,
                                                    netns=net.registry.ns))
    address = registry.address
    expected: str | None = None
    if image == "small":
        layout, name = work / "layout", "cluster/small"
        expected = build_small_image(layout, data_mib << 20)
    else:
        from realistic_image import build_realistic_image

        if (cache / "layout.json").exists():  # built (written last): reading it needs no lock
            layout, _ = build_realistic_image(cache)
        else:
            with open(BENCH_LOCK, "w") as lock:  # others may be building it: one build at a time
                fcntl.flock(lock, fcntl.LOCK_EX)
                layout, _ = build_realistic_image(cache)
        name = "cluster/torch"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest",
                    f"docker://{address}/{name}:original"], check=True, capture_output=True, timeout=1800)
    seekable = f"{address}/{name}:seekable"
    sizing = ["--chunk-size", str(chunk_size)] if chunk_size else []
    peerpull_cli("convert", f"{address}/{name}:original", seekable, "--quiet", *sizing, registry=address)
    config = RegistryConfig(insecure_hosts=(address,))
    digests, size = asyncio.run(_layers(seekable, config))
    return Setup(net, registry, seekable, digests, size, expected, config, work)


async def _cold_start(setup: Setup, cluster: Cluster) -> list[dict[str, Any]]:
    """All nodes pull and run the image at once; one record per node."""
    start = asyncio.Event()

    async def one(node: Node) -> dict[str, Any]:
        assert node.ctrd is not None and node.daemon is not None
        opts = RunOptions(setup.image, mode="lazy", address=str(node.ctrd.socket), namespace="bench",
                          daemon_metrics=f"http://{node.address}/metrics", timeout_s=1800)
        await start.wait()  # the barrier: every node's run begins in the same loop turn
        result = await run_image(opts, setup.registry_config)
        output = result.output.strip()
        ok = result.exit_code == 0 and (setup.expected_output is None or output.splitlines()[-1:] == [setup.expected_output])
        return {"node": node.index, "ready_s": result.ready_s, "pull_s": result.pull_s, "exit_code": result.exit_code,
                "output": output[-300:], "output_ok": ok, "tiers": result.bytes_by_tier}

    tasks = [asyncio.create_task(one(node)) for node in cluster.nodes]
    await asyncio.sleep(0)
    start.set()
    return list(await asyncio.gather(*tasks))


def save_feed(setup: Setup, node: Node, directory: Path, wait_s: float = 8.0) -> str:
    """The image's TOC and the startup profile `node` recorded (bench/sim/feed_files.py), for
    `bench/simulate --feed DIR`. The recorder saves a profile once reads have been quiet for
    snapshotter.profile_quiet_s (5 s); one that read most of the image is dropped: then the TOC alone."""
    from sim.feed_files import registry_refs, save_toc

    directory.mkdir(parents=True, exist_ok=True)
    refs, manifest_digest = asyncio.run(registry_refs(setup.image))
    save_toc(directory / "toc.json", setup.image, manifest_digest, refs)
    assert node.daemon is not None
    stored = node.daemon.root / "snapshotter" / "profiles" / (manifest_digest.split(":", 1)[1] + ".json")
    deadline = time.monotonic() + wait_s
    while not stored.exists() and time.monotonic() < deadline:
        time.sleep(0.25)
    (directory / "profile.json").unlink(missing_ok=True)
    if stored.exists():
        shutil.copyfile(stored, directory / "profile.json")
        return f"TOC ({len(refs)} frames) and node {node.index}'s startup profile"
    return f"TOC ({len(refs)} frames); no startup profile (none recorded, or it read most of the image)"


def cold_start(setup: Setup, count: int, single_bytes: int | None, feed_dir: Path | None = None) -> dict[str, Any]:
    with Cluster(setup.net, count, setup.work / f"cold-{count}", setup.node_env()) as cluster:
        before = [Snapshot.of(n) for n in cluster.nodes]
        egress0 = setup.egress()
        wall, busy0 = time.monotonic(), machine_busy()
        per_node = asyncio.run(_cold_start(setup, cluster))
        wall, busy1 = time.monotonic() - wall, machine_busy()
        time.sleep(1.0)  # counters settle (the last frames in flight are counted)
        egress = setup.egress() - egress0
        after = [Snapshot.of(n) for n in cluster.nodes]
        if feed_dir is not None:
            print(f"  saved to {feed_dir}: {save_feed(setup, cluster.nodes[0], feed_dir)}", flush=True)
    for record, b, a in zip(per_node, before, after):
        record.update(b.delta(a))
    ready = [r["ready_s"] for r in per_node if r["ready_s"] is not None]
    single = single_bytes if single_bytes is not None else egress
    return {"mode": "cold", "nodes": count, "egress_bytes": egress, "single_node_bytes": single,
            "egress_ratio": round(egress / single, 3) if single else None,
            "p50_ready_s": round(statistics.median(ready), 3) if ready else None,
            "max_ready_s": round(max(ready), 3) if ready else None,
            "outputs_ok": all(r["output_ok"] for r in per_node), "wall_s": round(wall, 2),
            # the daemons' CPU over the run ÷ the machine's: near 1, the nodes were CPU-bound, not link-bound
            "daemon_cpu_share": round(sum(r["daemon_cpu_s"] for r in per_node) / (wall * (os.cpu_count() or 1)), 2),
            "machine_busy": round((busy1[0] - busy0[0]) / max(1.0, busy1[1] - busy0[1]), 2),  # every process's
            "max_upload_bytes": max(r["link_tx_bytes"] for r in per_node),
            "max_upload_ratio": round(max(r["link_tx_bytes"] for r in per_node) / single, 3) if single else None,
            "max_served_bytes": max(r["served_bytes"] for r in per_node), "per_node": per_node}


def warm(setup: Setup, count: int, link_bytes_per_s: float | None, registry_bytes_per_s: float | None,
         split: bool = True) -> dict[str, Any]:
    """`peerpull warm` on all nodes at once. Two reference times: the issue's estimate (each node
    takes its share at its link's rate, then the rest from peers) and the floor no warm-up beats:
    every node receives the whole image over its own link, and the registry sends it once."""
    env = {**setup.node_env(), "PEERPULL_PEER_WARM_SPLIT": "true" if split else "false"}
    with Cluster(setup.net, count, setup.work / f"warm-{count}-{split}", env) as cluster:
        before = [Snapshot.of(n) for n in cluster.nodes]
        egress0 = setup.egress()
        nodes = [a for n in cluster.nodes for a in ("--node", n.address)]
        started = time.monotonic()
        result = peerpull_cli("warm", setup.image, *nodes, registry=setup.registry.address,
                              env={"PEERPULL_PEER_TOKEN": TOKEN})
        seconds = time.monotonic() - started
        time.sleep(1.0)
        egress = setup.egress() - egress0
        after = [Snapshot.of(n) for n in cluster.nodes]
        served_from_origin = [n.metrics().get('peerpull_served_chunks_total{source="origin"}', 0.0)
                              for n in cluster.nodes]
    answer = json.loads(result.stdout)
    reports = answer["nodes"] if count > 1 else {cluster.nodes[0].address: answer}  # one node: its report alone
    per_node = []
    for node, b, a, origin_serves in zip(cluster.nodes, before, after, served_from_origin):
        report = reports[node.address]
        per_node.append({"node": node.index, **b.delta(a), "report": report, "served_from_origin": origin_serves})
    predicted = floor = None
    if link_bytes_per_s and registry_bytes_per_s:
        share = setup.image_bytes / count
        predicted = round(setup.image_bytes / (count * link_bytes_per_s) + share / link_bytes_per_s, 2)
        floor = round(max(setup.image_bytes / link_bytes_per_s, setup.image_bytes / registry_bytes_per_s), 2)
    seconds_by_node = [float(p["report"]["seconds"]) for p in per_node if p["report"].get("seconds") is not None]
    return {"mode": "warm", "nodes": count, "split": split,
            # for warm records, "ready" is a node's warm-up done (its own fetch time, from its report)
            "p50_ready_s": round(statistics.median(seconds_by_node), 3) if seconds_by_node else None,
            "max_ready_s": round(max(seconds_by_node), 3) if seconds_by_node else None, "warm_s": round(seconds, 2), "image_bytes": setup.image_bytes,
            "egress_bytes": egress, "egress_ratio": round(egress / setup.image_bytes, 3),
            "predicted_s": predicted, "floor_s": floor, "node_seconds": [p["report"].get("seconds") for p in per_node],
            "max_upload_bytes": max(r["link_tx_bytes"] for r in per_node),
            "per_node": per_node}


def tc_rate_bytes(rate: str) -> float | None:
    """tc's rate syntax (e.g. 200mbit, 50mbps) in bytes per second; None if not understood."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(bit|bps)", rate.lower())
    if not m:
        return None
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m[2]]
    return float(m[1]) * scale / (8 if m[3] == "bit" else 1)


def table(records: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    cold = [r for r in records if r["mode"] == "cold"]
    if cold:
        alone = cold[0]["p50_ready_s"]
        lines += ["| N | ready p50 | ready max | p50 ÷ one node alone | registry egress | ÷ one node's need "
                  "| max upload per node (link) | max served to peers | daemons' CPU ÷ machine | machine busy | outputs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in cold:
            ratio = f"{r['p50_ready_s'] / alone:.2f}×" if alone and r["p50_ready_s"] else "–"
            lines.append(f"| {r['nodes']} | {r['p50_ready_s']} s | {r['max_ready_s']} s | {ratio} "
                         f"| {r['egress_bytes'] / 1e6:.1f} MB | {r['egress_ratio']}× | {r['max_upload_bytes'] / 1e6:.1f} MB "
                         f"| {r['max_served_bytes'] / 1e6:.1f} MB | {r['daemon_cpu_share']} | {r['machine_busy']} "
                         f"| {'all correct' if r['outputs_ok'] else 'WRONG'} |")
    warm_rows = [r for r in records if r["mode"] == "warm"]
    if warm_rows:
        lines += ["", "| N (warm) | split | time (CLI, all nodes) | slowest node's fetch | issue's estimate "
                  "image÷(N×link)+share÷link | floor image÷min(link, registry link) | registry egress ÷ image "
                  "| max upload per node | chunks from origin per node | from peers per node | fallbacks "
                  "| peer requests that waited on an owner's registry fetch |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in warm_rows:
            origin = "/".join(str(p["report"].get("tiers", {}).get("origin", 0)) for p in r["per_node"])
            peer = "/".join(str(p["report"].get("tiers", {}).get("peer", 0)) for p in r["per_node"])
            fallbacks = "/".join(str(p["report"].get("fallbacks", 0)) for p in r["per_node"])
            split = "yes" if r["split"] else "no"
            waited = sum(p["served_from_origin"] for p in r["per_node"])
            slowest = max((t for t in r["node_seconds"] if t is not None), default=None)
            lines.append(f"| {r['nodes']} | {split} | {r['warm_s']} s | {slowest} s | {r['predicted_s']} s | {r['floor_s']} s "
                         f"| {r['egress_ratio']}× "
                         f"| {r['max_upload_bytes'] / 1e6:.1f} MB | {origin} | {peer} | {fallbacks} | {waited:.0f} |")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    counts = sorted(set(args.nodes))
    work = Path(tempfile.mkdtemp(prefix="p4-cluster-", dir="/var/tmp"))
    records: list[dict[str, Any]] = []
    try:
        with ExitStack() as stack:
            net = stack.enter_context(ClusterNet(max(counts), args.rate, args.registry_rate or args.rate))
            print(f"network: {net.nodes} node namespaces + registry on bridge {net.bridge} ({net.prefix}.0/24); "
                  f"node links tbf {args.rate}, registry link tbf {args.registry_rate or args.rate}", flush=True)
            setup = prepare(stack, net, work, args.image, args.data_mib, Path(args.cache), args.chunk_size)
            print(f"image {setup.image}: {setup.image_bytes / 1e6:.1f} MB of seekable layers", flush=True)
            single: int | None = None
            if not args.warm_only:
                for count in sorted({1, *counts}):  # N=1 first: what one node alone needs
                    print(f"cold start, N={count} …", flush=True)
                    # the feed is saved from the N=1 run: one node's profile, as a first start records it
                    feed_dir = Path(args.save_feed) if args.save_feed and single is None else None
                    record = cold_start(setup, count, single, feed_dir)
                    single = record["single_node_bytes"] if single is None else single
                    if setup.expected_output is None and record["outputs_ok"]:  # torch: what one node alone printed
                        setup.expected_output = record["per_node"][0]["output"].splitlines()[-1]
                    records.append(record)
                    print(f"  p50 {record['p50_ready_s']} s, max {record['max_ready_s']} s, "
                          f"egress {record['egress_ratio']}×, outputs ok: {record['outputs_ok']}", flush=True)
            if args.warm or args.warm_only:
                for count in counts:
                    for split in (True, False) if args.compare else (True,):
                        print(f"warm-up, N={count}, split={split} …", flush=True)
                        record = warm(setup, count, tc_rate_bytes(args.rate), tc_rate_bytes(args.registry_rate or args.rate),
                                      split)
                        records.append(record)
                        print(f"  {record['warm_s']} s, egress {record['egress_ratio']}× the image", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for record in records:  # what bench/simulate --calibrate-json needs to simulate the same run
        record.update(rate=args.rate, registry_rate=args.registry_rate or args.rate,
                      rate_bytes_per_s=tc_rate_bytes(args.rate),
                      registry_rate_bytes_per_s=tc_rate_bytes(args.registry_rate or args.rate),
                      image=args.image, feed=str(Path(args.save_feed).resolve()) if args.save_feed else None)
    return records


def _on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"bench: stopped by signal {signum}; cleaning up")  # the with-blocks tear everything down


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n  bench/cluster --nodes 1,2,4 --rate 200mbit\n"
                                            "  bench/cluster --nodes 3 --warm --json cluster.json\n"
                                            "  bench/cluster --image torch --nodes 1,3 --rate 1gbit")
    parser.add_argument("--nodes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4],
                        help="cluster sizes, comma-separated (default 1,2,4); N=1 always runs first")
    parser.add_argument("--rate", default="200mbit", help="every node's link, each way, tc syntax (default 200mbit)")
    parser.add_argument("--registry-rate", default="", help="the registry's link (default: the node rate)")
    parser.add_argument("--image", choices=("small", "torch"), default="small",
                        help="small: busybox + --data-mib of random files (default); torch: bench/realistic_image.py")
    parser.add_argument("--data-mib", type=int, default=32, help="small image: MiB of data the container reads")
    parser.add_argument("--chunk-size", type=int, default=0, help="convert --chunk-size (default: convert's own)")
    parser.add_argument("--warm", action="store_true", help="also warm the image across each cluster size")
    parser.add_argument("--warm-only", action="store_true", help="only the warm-ups")
    parser.add_argument("--compare", action="store_true",
                        help="warm each size twice: split (default) and the ordinary way (peer.warm_split = false)")
    parser.add_argument("--cache", default="/var/cache/peerpull-bench", help="where the torch image is built/kept")
    parser.add_argument("--json", metavar="FILE", help="write one record per N (and mode) as JSON")
    parser.add_argument("--save-feed", metavar="DIR",
                        help="save the image's TOC and the N=1 node's startup profile for bench/simulate --feed DIR")
    args = parser.parse_args()
    if args.save_feed and args.warm_only:
        raise SystemExit("--save-feed needs a cold start (not --warm-only)")
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, containerd, FUSE)")
    if min(args.nodes) < 1 or max(args.nodes) > 50:
        raise SystemExit("--nodes must be between 1 and 50")
    signal.signal(signal.SIGTERM, _on_signal)
    records = run_bench(args)
    header = (f"nodes: own netns + containerd + peerpull daemon, static peers; node links tbf {args.rate} each way, "
              f"registry link tbf {args.registry_rate or args.rate}; image: {args.image}; machine: 2 cores, loaded")
    print("\n" + table(records, header))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    return 0 if all(r.get("outputs_ok", True) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
