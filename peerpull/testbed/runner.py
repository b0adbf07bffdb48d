"""Run one container of an image and time it: `--mode lazy` (peerpull pull + the peerpull
snapshotter) or `--mode normal` (containerd's own pull + overlayfs), on a private set-up or on a
given containerd. Shared by `peerpull run`, the quickstart and bench/coldstart.

Times are measured from the start of the pull: container start (containerd's /tasks/start
event), first line the container prints, and completion (exit) or readiness (an HTTP endpoint
answers 2xx). Bytes by tier come from the daemon's metrics (lazy: cache, peer, origin) plus the
layers downloaded in full (`download`: every layer in normal mode; in lazy mode the layers that
fell back or are not seekable), so `registry_wire_bytes` is what the registry really sent.

A private set-up is recognised later by `peerpull clean` through the marker written into it
(peerpull.testbed.setup_marker): its outside directories and processes are recorded there as
soon as they exist. The caller's global options reach the private daemon: the whole registry
section as `PEERPULL_REGISTRY_*` variables, plus `global_args` (`--config`, `--log-level`).

The container's docker-style settings (env, bind mounts, network, GPUs, name, removal) become
`ctr run` flags in `container_flags`; with `sample_every_s` the daemon's bytes by tier are sampled
during a lazy run (for `peerpull run --plot`), and `ports` are probed until they first answer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from converter.format.errors import AlreadyExistsError, ConfigError, PeerpullError
from converter.registry.client import MAX_CONFIG_BYTES, RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.manifest import parse_manifest
from converter.registry.reference import ImageReference
from peer.metrics import by_tier, parse_exposition
from peerpull.testbed.containerd import EmbeddedContainerd
from peerpull.testbed.daemon import EmbeddedDaemon
from peerpull.testbed.setup_marker import SetupMarker, has_marker
from snapshotter.containerd.client import ContainerdClient
from snapshotter.containerd.pull import config_on_node, pull, resolve_on_node

MAX_OUTPUT_LINE = 4096  # a longer line of the container's output is cut (kept in the summary, logged)
RUN_LABEL = "io.peerpull.run"
DEFAULT_WORK_ROOT = Path("/var/tmp/peerpull-run")


@dataclass
class RunOptions:
    image: str
    mode: str = "lazy"  # lazy | normal
    benchmark_mode: str = "completion"  # completion | readiness
    readiness_endpoint: str = ""
    args: list[str] = field(default_factory=list)
    address: str = ""  # a given containerd; empty: a private one
    namespace: str = "peerpull-run"
    snapshotter: str = "peerpull"
    daemon_metrics: str = "http://127.0.0.1:7470/metrics"  # of the daemon serving a given containerd
    timeout_s: float = 600.0
    work_dir: str = ""
    keep: bool = False
    daemon_env: dict[str, str] = field(default_factory=dict)  # extra settings for a private daemon
    peers: list[str] = field(default_factory=list)  # static peers for a private daemon
    global_args: list[str] = field(default_factory=list)  # peerpull global options for a private daemon
    on_start: Callable[[], None] | None = None  # called when containerd reports the task started (benchmarks)
    # docker-style container settings (peerpull run's flags); the defaults are what benchmarks need
    env: list[str] = field(default_factory=list)  # K=V
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)  # (host path, container path, read-only)
    net_host: bool = True  # False: the container's own network namespace (loopback only: no CNI here)
    ports: list[int] = field(default_factory=list)  # host ports probed until something answers (-p)
    gpus: list[int] = field(default_factory=list)  # GPU indices, through containerd's NVIDIA hook
    name: str = ""  # container id; empty: a generated one
    rm: bool = True  # remove the container (and its snapshot) when it exits
    sample_every_s: float = 0.0  # > 0: sample the daemon's bytes by tier this often (lazy mode; for plots)


@dataclass
class RunResult:
    image: str
    mode: str
    pull_s: float = 0.0
    start_s: float = 0.0
    first_log_s: float | None = None
    ready_s: float | None = None  # completion or readiness, by benchmark mode
    exit_code: int | None = None
    output: str = ""
    bytes_by_tier: dict[str, float] = field(default_factory=dict)  # cache, peer, origin; download: full layers
    registry_wire_bytes: float = 0.0  # compressed bytes from the registry: lazy fetches plus full downloads
    layers: int = 0
    lazy_layers: int = 0  # served lazily by the snapshotter
    present_layers: int = 0  # already unpacked before this run
    fallback_layers: list[str] = field(default_factory=list)  # lazy mode: layers downloaded in full
    fallback_reasons: list[str] = field(default_factory=list)  # why, as the daemon logged or counted it
    container: str = ""  # its id in containerd
    removed: bool = True  # False: the container was kept (run without --rm)
    ports_reachable_s: dict[str, float | None] = field(default_factory=dict)  # host port → first connect
    tier_samples: list[dict[str, float]] = field(default_factory=list)  # {"t": s, tier: bytes} from the pull's start

    @property
    def mode_summary(self) -> str:
        """`lazy`, or `lazy (N of M layers fell back)` when some layers were downloaded in full."""
        if self.mode == "lazy" and self.fallback_layers:
            return f"lazy ({len(self.fallback_layers)} of {self.layers} layers fell back)"
        return self.mode

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mode_summary": self.mode_summary}


def registry_env(registry: RegistryConfig) -> dict[str, str]:
    """The registry section as the `PEERPULL_REGISTRY_*` variables a child peerpull reads."""
    out = {}
    for f in dataclasses.fields(registry):
        value = getattr(registry, f.name)
        if value is None:
            text = ""
        elif isinstance(value, (tuple, list)):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        out[f"PEERPULL_REGISTRY_{f.name.upper()}"] = text
    return out


def _plain_http(ref: ImageReference, registry: RegistryConfig) -> bool:
    return ref.is_loopback or ref.registry in registry.insecure_hosts


async def _image_facts(client: RegistryClient, ctrd: ContainerdClient,
                       ref: ImageReference) -> tuple[int, int, list[str], list[str]]:
    """Total layer bytes, number of layers, Entrypoint and Cmd of the image. A node that holds the
    image answers from containerd's content store (checked by digest): a second run sends nothing."""
    fetched, _ = await resolve_on_node(client, ctrd, ref)
    manifest = parse_manifest(fetched.body, fetched.media_type, str(ref))
    config = json.loads(await config_on_node(client, ctrd, ref, manifest["config"]["digest"], MAX_CONFIG_BYTES))
    c = config.get("config") or {}
    return (sum(int(d["size"]) for d in manifest["layers"]), len(manifest["layers"]),
            list(c.get("Entrypoint") or []), list(c.get("Cmd") or []))


def _metrics(url: str) -> dict[str, float]:
    """The daemon's metrics, or nothing when it cannot be reached (bytes by tier then read 0)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return parse_exposition(resp.read().decode())
    except OSError:
        return {}


class _Ctr:
    """`ctr` against one containerd socket and namespace."""

    def __init__(self, address: str, namespace: str) -> None:
        self.base = ["ctr", "--address", address, "--namespace", namespace]

    async def run(self, *args: str, timeout: float = 600) -> str:
        proc = await asyncio.create_subprocess_exec(*self.base, *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            raise PeerpullError(f"ctr {' '.join(args[:2])} timed out after {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise PeerpullError(f"ctr {' '.join(args[:2])} failed: {err.decode(errors='replace').strip()[-800:]}")
        return out.decode(errors="replace")


SYNC_LABEL = "io.peerpull.run.sync"


async def _watch_start(ctr: _Ctr, container_id: str, started: asyncio.Future[float], live: asyncio.Event,
                       on_start: Callable[[], None] | None) -> None:
    """Resolve `started` with the monotonic time containerd reports the task started; set `live`
    once the subscription delivered our own sync event (see _subscribe)."""
    proc = await asyncio.create_subprocess_exec(*ctr.base, "events", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        while not started.done():
            line = await proc.stdout.readline()
            if not line:
                return
            if b"/namespaces/update" in line and f'"{SYNC_LABEL}":"{container_id}"'.encode() in line:
                live.set()
            if b"/tasks/start" in line and container_id.encode() in line:
                started.set_result(time.monotonic())
                if on_start is not None:
                    on_start()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _subscribed(ctr: _Ctr, namespace: str, token: str, live: asyncio.Event, watcher: asyncio.Task[None],
                      timeout_s: float = 30.0) -> None:
    """Until the event subscription is live: label the namespace with `token` (an event of its
    own) and wait for the watcher to see it; again if it was published before the subscription."""
    deadline = time.monotonic() + timeout_s
    while not live.is_set():
        if watcher.done() or time.monotonic() >= deadline:
            raise PeerpullError(f"`ctr events` delivered no event within {timeout_s:.0f} s")
        await ctr.run("namespaces", "label", namespace, f"{SYNC_LABEL}={token}", timeout=30)
        try:
            await asyncio.wait_for(live.wait(), 1.0)
        except TimeoutError:
            continue


async def _wait_members(metrics_url: str, count: int, timeout_s: float = 15.0) -> None:
    """Until the private daemon's health checks found its static peers alive."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (await asyncio.to_thread(_metrics, metrics_url)).get("peerpull_members", 0) >= count:
            return
        await asyncio.sleep(0.2)
    raise PeerpullError(f"the peers were not reachable within {timeout_s:.0f} s")


async def _wait_ready(url: str, deadline: float) -> float:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return 200 <= resp.status < 300
        except (OSError, urllib.error.HTTPError):
            return False

    while time.monotonic() < deadline:
        if await asyncio.to_thread(probe):
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise PeerpullError(f"{url} did not become ready in time")


GPU_TOOLKIT = ("nvidia-container-runtime-hook", "nvidia-ctk")


def resolve_gpus(spec: str) -> list[int]:
    """`--gpus all|N|device=I[,J]` → GPU indices for containerd's NVIDIA hook (`ctr run --gpus`),
    which runs nvidia-container-cli; the NVIDIA container toolkit must be installed."""
    text = spec.strip()
    wanted: list[int] | None = None  # None: all
    if text.startswith("device="):
        try:
            wanted = sorted({int(d) for d in text[len("device="):].strip("\"'").split(",")})
        except ValueError:
            raise ConfigError(f"--gpus {spec}: device= takes GPU indices (device=0,1); UUIDs are not supported "
                              "by containerd's hook") from None
    elif text != "all":
        try:
            count = int(text)
        except ValueError:
            raise ConfigError(f"--gpus {spec}: give all, a count N, or device=I[,J]") from None
        if count < 1:
            raise ConfigError(f"--gpus {spec}: the count must be at least 1")
        wanted = list(range(count))
    if not any(shutil.which(tool) for tool in GPU_TOOLKIT):
        raise ConfigError(f"--gpus needs the NVIDIA container toolkit: neither {' nor '.join(GPU_TOOLKIT)} is in "
                          "PATH (install nvidia-container-toolkit)")
    for tool in ("nvidia-container-cli", "nvidia-smi"):
        if shutil.which(tool) is None:
            raise ConfigError(f"--gpus needs {tool} in PATH (install the NVIDIA driver utilities and "
                              "libnvidia-container-tools)")
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    present = [i for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU ")]
    if not present:
        raise ConfigError("--gpus: nvidia-smi -L lists no GPU on this node")
    chosen = present if wanted is None else wanted
    missing = [i for i in chosen if i not in present]
    if missing:
        raise ConfigError(f"--gpus {spec}: this node has {len(present)} GPU(s); no GPU {missing[0]}")
    return chosen


def container_flags(opts: RunOptions) -> list[str]:
    """`ctr run` flags for the docker-style settings."""
    out = ["--rm"] if opts.rm else []
    if opts.net_host:
        out.append("--net-host")
    for kv in opts.env:
        out += ["--env", kv]
    for src, dst, ro in opts.mounts:
        out += ["--mount", f"type=bind,src={src},dst={dst},options=rbind:{'ro' if ro else 'rw'}"]
    for index in opts.gpus:
        out += ["--gpus", str(index)]
    return out


async def _probe_ports(ports: list[int], t0: float, out: dict[str, float | None]) -> None:
    """When each host port first accepts a connection (what -p can say without a CNI)."""
    for port in ports:
        out[str(port)] = None
    while await _probe_round(ports, t0, out):
        await asyncio.sleep(0.1)


async def _probe_round(ports: list[int], t0: float, out: dict[str, float | None]) -> bool:
    """Try each port not yet seen once; whether some are still not answering."""
    for port in [p for p in ports if out.get(str(p)) is None]:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        except (OSError, TimeoutError):
            continue
        writer.close()
        out[str(port)] = round(time.monotonic() - t0, 3)
    return any(out.get(str(p)) is None for p in ports)


async def _sample_tiers(url: str, before: dict[str, float], t0: float, every_s: float,
                        out: list[dict[str, float]]) -> None:
    """Uncompressed bytes by tier since the pull started, every `every_s` (for --plot)."""
    b0 = by_tier(before, "peerpull_chunk_bytes_total")
    while True:
        now = by_tier(await asyncio.to_thread(_metrics, url), "peerpull_chunk_bytes_total")
        out.append({"t": round(time.monotonic() - t0, 3), **{t: now[t] - b0[t] for t in now}})
        await asyncio.sleep(every_s)


async def _run_container(ctr: _Ctr, opts: RunOptions, argv: list[str], t0: float, result: RunResult,
                         log: Callable[[str], None]) -> None:
    container_id = opts.name or f"peerpull-run-{uuid.uuid4().hex[:10]}"
    result.container, result.removed = container_id, opts.rm
    snap = ["--snapshotter", opts.snapshotter] if opts.mode == "lazy" else []
    started: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    live = asyncio.Event()
    watcher = asyncio.create_task(_watch_start(ctr, container_id, started, live, opts.on_start))
    try:
        await _subscribed(ctr, opts.namespace, container_id, live, watcher)
    except BaseException:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        raise
    cmd = [*ctr.base, "run", *container_flags(opts), "--label", f"{RUN_LABEL}=1", *snap, opts.image, container_id,
           *argv]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                stdin=asyncio.subprocess.DEVNULL)
    lines: collections.deque[str] = collections.deque(maxlen=50)  # the summary keeps the last lines
    deadline = time.monotonic() + opts.timeout_s

    def emit(raw: bytes) -> None:
        text = raw[:MAX_OUTPUT_LINE].decode(errors="replace")
        lines.append(text)
        log(text)

    async def read_output() -> None:
        # chunks, not readline: a line longer than the stream's limit (binary output, a progress bar
        # redrawn with \r) made readline raise, the pipe filled up and the container hung on its writes
        assert proc.stdout is not None
        pending = b""
        while chunk := await proc.stdout.read(1 << 16):
            if result.first_log_s is None:
                result.first_log_s = round(time.monotonic() - t0, 3)
            *complete, pending = (pending + chunk).split(b"\n")
            for raw in complete:
                emit(raw)
            if len(pending) > MAX_OUTPUT_LINE:  # memory stays bounded however long the line
                emit(pending)
                pending = b""
        if pending:
            emit(pending)

    reader = asyncio.create_task(read_output())
    prober = asyncio.create_task(_probe_ports(opts.ports, t0, result.ports_reachable_s)) if opts.ports else None
    try:
        if opts.benchmark_mode == "readiness":
            ready_at = await _wait_ready(opts.readiness_endpoint, deadline)
            result.ready_s = round(ready_at - t0, 3)
            if prober is not None:  # one last look before the kill: ready may come between two probes
                await _probe_round(opts.ports, t0, result.ports_reachable_s)
            await ctr.run("tasks", "kill", "--signal", "SIGKILL", container_id, timeout=30)
        result.exit_code = await asyncio.wait_for(proc.wait(), max(1.0, deadline - time.monotonic()))
        if opts.benchmark_mode == "completion":
            result.ready_s = round(time.monotonic() - t0, 3)
        await asyncio.wait_for(reader, 10)
    except TimeoutError:
        proc.kill()
        raise PeerpullError(f"the container did not finish within {opts.timeout_s:.0f} s") from None
    finally:
        if started.done():
            result.start_s = round(started.result() - t0, 3)
        watcher.cancel()
        if prober is not None:
            prober.cancel()
        await asyncio.gather(watcher, *([prober] if prober else []), return_exceptions=True)
    result.output = "\n".join(lines)


def _work_dir(opts: RunOptions) -> Path:
    """The private set-up's directory: new, or empty (run deletes it afterwards, so never a
    directory holding anything else)."""
    work = Path(opts.work_dir) if opts.work_dir else DEFAULT_WORK_ROOT / f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise ConfigError(f"--work-dir {work} is not a directory; give a new or empty directory")
    if work.is_dir() and any(work.iterdir()):
        hint = (f"it holds an earlier set-up: remove it with `peerpull clean --work-root {work}`"
                if has_marker(work) else "give a new or empty directory")
        raise ConfigError(f"--work-dir {work} is not empty; {hint}")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --work-dir {work}: {exc.strerror}; give a writable directory") from None
    return work


def _fallback_reasons(before: dict[str, float], after: dict[str, float], daemon: EmbeddedDaemon | None,
                      ordinary: int) -> list[str]:
    """Why layers were downloaded in full: the daemon's own words when its log is ours, else the
    reasons its metrics counted."""
    reasons: list[str] = []
    if daemon is not None:
        reasons = list(dict.fromkeys(str(e.get("error", "")) for e in daemon.events("lazy_layer_fallback")))
    if not reasons:
        prefix = 'peerpull_chunk_errors_total{reason="'
        for key, value in after.items():
            if key.startswith(prefix) and key.endswith('",tier="lazy"}') and value > before.get(key, 0.0):
                reason = key[len(prefix):key.index('"', len(prefix))]
                reasons.append(f"{reason} x{value - before.get(key, 0.0):.0f}")
    if ordinary:
        reasons.append(f"{ordinary} layer(s) not seekable (convert the image with peerpull convert)")
    return reasons


async def _container_exists(ctr: _Ctr, name: str) -> bool:
    try:
        await ctr.run("containers", "info", name, timeout=30)
    except PeerpullError:
        return False
    return True


async def run_image(opts: RunOptions, registry: RegistryConfig, log: Callable[[str], None] = lambda s: None) -> RunResult:
    if opts.mode not in ("lazy", "normal"):
        raise ConfigError("--mode must be lazy or normal")
    if opts.benchmark_mode == "readiness" and not opts.readiness_endpoint:
        raise ConfigError("--benchmark-mode readiness needs --readiness-endpoint URL")
    if shutil.which("ctr") is None:
        raise ConfigError("ctr not found: install the containerd package")
    ref = ImageReference.parse(opts.image)
    result = RunResult(str(ref), opts.mode)
    daemon: EmbeddedDaemon | None = None
    with ExitStack() as stack:
        if opts.address:
            address, metrics_url = opts.address, opts.daemon_metrics
        else:
            if os.geteuid() != 0:
                raise ConfigError("a private set-up needs root (containerd, FUSE); or pass --address of a running containerd")
            work = _work_dir(opts)
            marker = SetupMarker.create(work)  # first, so `peerpull clean` knows it after any crash
            if not opts.keep:
                stack.callback(marker.remove)
            daemon = EmbeddedDaemon(work / "daemon", peers=opts.peers, discovery="static" if opts.peers else "none",
                                    extra_env={**registry_env(registry), **opts.daemon_env},
                                    global_args=opts.global_args,
                                    on_spawn=lambda pid: marker.add_process("daemon", pid))
            marker.add_dir(daemon.sock_dir)
            stack.enter_context(daemon)
            ctrd_root = Path(tempfile.mkdtemp(prefix="pp-run-", dir="/run"))  # short socket paths
            marker.add_dir(ctrd_root)
            stack.callback(shutil.rmtree, ctrd_root, True)
            ctrd = EmbeddedContainerd(ctrd_root, proxy_plugins={opts.snapshotter: str(daemon.socket)},
                                      on_spawn=lambda pid: marker.add_process("containerd", pid))
            marker.containerd_socket = str(ctrd.socket)
            marker.save()
            stack.enter_context(ctrd)
            address, metrics_url = str(ctrd.socket), f"http://{daemon.peer_address}/metrics"
            if opts.peers:
                await _wait_members(metrics_url, 1 + len(opts.peers))
        ctr = _Ctr(address, opts.namespace)
        if opts.name and opts.address and await _container_exists(ctr, opts.name):
            raise AlreadyExistsError(f"a container named {opts.name} already exists in namespace {opts.namespace}; "
                                     f"remove it (ctr -n {opts.namespace} containers rm {opts.name}) or choose "
                                     "another --name")
        async with RegistryClient(registry) as client, ContainerdClient(address, opts.namespace) as ctrd_client:
            image_bytes, layer_count, entrypoint, cmd = await _image_facts(client, ctrd_client, ref)
            result.layers = layer_count
            argv = [*entrypoint, *opts.args] if opts.args else []
            before = _metrics(metrics_url) if opts.mode == "lazy" else {}
            t0 = time.monotonic()
            sampler = None
            if opts.sample_every_s > 0 and opts.mode == "lazy":
                sampler = asyncio.create_task(_sample_tiers(metrics_url, before, t0, opts.sample_every_s,
                                                            result.tier_samples))
            report = None
            if opts.mode == "lazy":
                report = await pull(client, ctrd_client, str(ref), opts.snapshotter)
            else:
                plain = ["--plain-http"] if _plain_http(ref, registry) else []
                platform = ["--platform", registry.platform] if registry.platform else []  # "": ctr's own default
                await ctr.run("images", "pull", *plain, *platform, str(ref), timeout=opts.timeout_s)
            try:
                result.pull_s = round(time.monotonic() - t0, 3)
                await _run_container(ctr, opts, argv, t0, result, log)
            finally:
                if sampler is not None:
                    sampler.cancel()
                    await asyncio.gather(sampler, return_exceptions=True)
        if report is not None:
            after = _metrics(metrics_url)
            b0, b1 = by_tier(before, "peerpull_chunk_bytes_total"), by_tier(after, "peerpull_chunk_bytes_total")
            result.bytes_by_tier = {t: b1[t] - b0[t] for t in b1}
            if sampler is not None:  # the timeline ends where the totals do (the sampler may have slept through the end)
                result.tier_samples.append({"t": round(time.monotonic() - t0, 3), **result.bytes_by_tier})
            result.bytes_by_tier["download"] = float(report.downloaded_bytes)
            w0, w1 = by_tier(before, "peerpull_chunk_wire_bytes_total"), by_tier(after, "peerpull_chunk_wire_bytes_total")
            result.registry_wire_bytes = w1["origin"] - w0["origin"] + report.downloaded_bytes
            result.lazy_layers, result.present_layers = report.lazy, report.already_present
            result.fallback_layers = [*report.fallbacks, *report.ordinary]
            if result.fallback_layers:
                result.fallback_reasons = _fallback_reasons(before, after, daemon, len(report.ordinary))
        else:
            result.bytes_by_tier = {"cache": 0.0, "peer": 0.0, "origin": 0.0, "download": float(image_bytes)}
            result.registry_wire_bytes = float(image_bytes)
    return result
