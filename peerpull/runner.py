"""Run one container of an image and time it: `--mode lazy` (peerpull pull + the peerpull
snapshotter) or `--mode normal` (containerd's own pull + overlayfs), on a private set-up or on a
given containerd. Shared by `peerpull run`, the quickstart and bench/coldstart.

Times are measured from the start of the pull: container start (containerd's /tasks/start
event), first line the container prints, and completion (exit) or readiness (an HTTP endpoint
answers 2xx). Bytes by tier come from the daemon's metrics (lazy) or the image's layer sizes
(normal: containerd downloads every layer).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from converter.errors import ConfigError, PeerpullError
from converter.image_source import parse_manifest
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from peer.metrics import by_tier, parse_exposition
from peerpull.embedded.containerd import EmbeddedContainerd
from peerpull.embedded.daemon import EmbeddedDaemon
from snapshotter.containerd_client import ContainerdClient
from snapshotter.pull import pull

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
    on_start: Callable[[], None] | None = None  # called when containerd reports the task started (benchmarks)


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
    bytes_by_tier: dict[str, float] = field(default_factory=dict)
    registry_wire_bytes: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plain_http(ref: ImageReference, registry: RegistryConfig) -> bool:
    return ref.is_loopback or ref.registry in registry.insecure_hosts


async def _image_facts(client: RegistryClient, ref: ImageReference) -> tuple[int, list[str], list[str]]:
    """Total layer bytes, Entrypoint and Cmd of the image."""
    fetched, _ = await client.resolve_image(ref)
    manifest = parse_manifest(fetched.body, fetched.media_type, str(ref))
    config = json.loads(await client.get_blob_bytes(ref, manifest["config"]["digest"]))
    c = config.get("config") or {}
    return sum(int(d["size"]) for d in manifest["layers"]), list(c.get("Entrypoint") or []), list(c.get("Cmd") or [])


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
        except asyncio.TimeoutError:
            proc.kill()
            raise PeerpullError(f"ctr {' '.join(args[:2])} timed out after {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise PeerpullError(f"ctr {' '.join(args[:2])} failed: {err.decode(errors='replace').strip()[-800:]}")
        return out.decode(errors="replace")


async def _watch_start(ctr: _Ctr, container_id: str, started: asyncio.Future[float],
                       on_start: Callable[[], None] | None) -> None:
    """Resolve `started` with the monotonic time containerd reports the task started."""
    proc = await asyncio.create_subprocess_exec(*ctr.base, "events", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        while not started.done():
            line = await proc.stdout.readline()
            if not line:
                return
            if b"/tasks/start" in line and container_id.encode() in line:
                started.set_result(time.monotonic())
                if on_start is not None:
                    on_start()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


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


async def _run_container(ctr: _Ctr, opts: RunOptions, argv: list[str], t0: float, result: RunResult,
                         log: Callable[[str], None]) -> None:
    container_id = f"peerpull-run-{uuid.uuid4().hex[:10]}"
    snap = ["--snapshotter", opts.snapshotter] if opts.mode == "lazy" else []
    started: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    watcher = asyncio.create_task(_watch_start(ctr, container_id, started, opts.on_start))
    await asyncio.sleep(0.2)  # let the event subscription settle before the task starts
    cmd = [*ctr.base, "run", "--rm", "--net-host", "--label", f"{RUN_LABEL}=1", *snap, opts.image, container_id, *argv]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                stdin=asyncio.subprocess.DEVNULL)
    lines: list[str] = []
    deadline = time.monotonic() + opts.timeout_s

    async def read_output() -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            if result.first_log_s is None:
                result.first_log_s = round(time.monotonic() - t0, 3)
            text = line.decode(errors="replace").rstrip("\n")
            lines.append(text)
            log(text)

    reader = asyncio.create_task(read_output())
    try:
        if opts.benchmark_mode == "readiness":
            ready_at = await _wait_ready(opts.readiness_endpoint, deadline)
            result.ready_s = round(ready_at - t0, 3)
            await ctr.run("tasks", "kill", "--signal", "SIGKILL", container_id, timeout=30)
        result.exit_code = await asyncio.wait_for(proc.wait(), max(1.0, deadline - time.monotonic()))
        if opts.benchmark_mode == "completion":
            result.ready_s = round(time.monotonic() - t0, 3)
        await asyncio.wait_for(reader, 10)
    except asyncio.TimeoutError:
        proc.kill()
        raise PeerpullError(f"the container did not finish within {opts.timeout_s:.0f} s") from None
    finally:
        if started.done():
            result.start_s = round(started.result() - t0, 3)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    result.output = "\n".join(lines[-50:])


async def run_image(opts: RunOptions, registry: RegistryConfig, log: Callable[[str], None] = lambda s: None) -> RunResult:
    if opts.mode not in ("lazy", "normal"):
        raise ConfigError("--mode must be lazy or normal")
    if opts.benchmark_mode == "readiness" and not opts.readiness_endpoint:
        raise ConfigError("--benchmark-mode readiness needs --readiness-endpoint URL")
    if shutil.which("ctr") is None:
        raise ConfigError("ctr not found: install the containerd package")
    ref = ImageReference.parse(opts.image)
    result = RunResult(str(ref), opts.mode)
    with ExitStack() as stack:
        if opts.address:
            address, metrics_url = opts.address, opts.daemon_metrics
        else:
            if os.geteuid() != 0:
                raise ConfigError("a private set-up needs root (containerd, FUSE); or pass --address of a running containerd")
            work = Path(opts.work_dir) if opts.work_dir else DEFAULT_WORK_ROOT / f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
            work.mkdir(parents=True, exist_ok=True)
            if not opts.keep:
                stack.callback(shutil.rmtree, work, True)
            daemon = stack.enter_context(EmbeddedDaemon(work / "daemon", peers=opts.peers,
                                                        discovery="static" if opts.peers else "none",
                                                        extra_env=opts.daemon_env))
            ctrd_root = Path(tempfile.mkdtemp(prefix="pp-run-", dir="/run"))  # short socket paths
            (work / "containerd.path").write_text(str(ctrd_root))  # for `peerpull clean` after a crash
            stack.callback(shutil.rmtree, ctrd_root, True)
            ctrd = stack.enter_context(EmbeddedContainerd(ctrd_root, proxy_plugins={opts.snapshotter: str(daemon.socket)}))
            address, metrics_url = str(ctrd.socket), f"http://{daemon.peer_address}/metrics"
            if opts.peers:
                await _wait_members(metrics_url, 1 + len(opts.peers))
        ctr = _Ctr(address, opts.namespace)
        async with RegistryClient(registry) as client:
            image_bytes, entrypoint, cmd = await _image_facts(client, ref)
            argv = [*entrypoint, *opts.args] if opts.args else []
            before = _metrics(metrics_url) if opts.mode == "lazy" else {}
            t0 = time.monotonic()
            if opts.mode == "lazy":
                async with ContainerdClient(address, opts.namespace) as ctrd_client:
                    await pull(client, ctrd_client, str(ref), opts.snapshotter)
            else:
                await ctr.run("images", "pull", *(["--plain-http"] if _plain_http(ref, registry) else []), str(ref),
                              timeout=opts.timeout_s)
            result.pull_s = round(time.monotonic() - t0, 3)
            await _run_container(ctr, opts, argv, t0, result, log)
        if opts.mode == "lazy":
            after = _metrics(metrics_url)
            b0, b1 = by_tier(before, "peerpull_chunk_bytes_total"), by_tier(after, "peerpull_chunk_bytes_total")
            result.bytes_by_tier = {t: b1[t] - b0[t] for t in b1}
            w0, w1 = by_tier(before, "peerpull_chunk_wire_bytes_total"), by_tier(after, "peerpull_chunk_wire_bytes_total")
            result.registry_wire_bytes = w1["origin"] - w0["origin"]
        else:
            result.bytes_by_tier = {"cache": 0.0, "peer": 0.0, "origin": float(image_bytes)}
            result.registry_wire_bytes = float(image_bytes)
    return result
