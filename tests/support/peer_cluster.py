"""Several `peerpull peer` node processes on loopback, for cluster tests and benchmarks."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import msgpack

from peer.metrics import parse_exposition
from peerpull.testbed.oci_layout import LayerSpec, write_layout
from peerpull.testbed.process import spawn_logged, stop_process
from peerpull.testbed.registry import free_port

TOKEN = "cluster-secret"


def build_cluster_image(root: Path, big_bytes: int = 6 << 20, small_files: int = 200) -> None:
    """Two layers: one large random file (many chunks) and many small files (one chunk each)."""
    rnd = random.Random(99)
    weights = LayerSpec()
    weights.add("model", type=tarfile.DIRTYPE)
    weights.add("model/weights.bin", rnd.randbytes(big_bytes))
    code = LayerSpec()
    code.add("app", type=tarfile.DIRTYPE)
    for i in range(small_files):
        code.add(f"app/m{i:04d}.py", rnd.randbytes(rnd.randint(100, 20_000)))
    write_layout(root, [weights.tar_bytes(), code.tar_bytes()])


class NodeProcess:
    def __init__(self, root: Path, node_id: str, port: int, peers: list[str], extra_env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", discovery: str = "static", netns: str | None = None) -> None:
        self.node_id, self.port, self.host = node_id, port, host
        self.address = f"{host}:{port}"
        self.log_path = root / f"{node_id}.log"
        cmd = [sys.executable, "-m", "peerpull", "--log-format", "json", "peer", "--listen", self.address,
               "--advertise", host, "--node-id", node_id, "--cache-dir", str(root / node_id), "--discovery", discovery]
        for peer in peers:
            cmd += ["--peer", peer]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        env = {**os.environ, "PEERPULL_PEER_TOKEN": TOKEN, "PEERPULL_PEER_HEALTH_INTERVAL_S": "0.3",
               **(extra_env or {})}
        env = {k: v for k, v in env.items() if v is not None}  # extra_env may remove one (None)
        self._env = env
        self._cmd = cmd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        self.proc = spawn_logged(self._cmd, self.log_path, env=self._env)
        return self

    def request(self, path: str, body: bytes | None = None, token: str | None = TOKEN, timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is not None and path == "/v1/warm":
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(f"http://{self.address}{path}", data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def chunks(self, refs: list, token: str | None = TOKEN, timeout: float = 120) -> tuple[int, dict[int, tuple[str, bytes]]]:
        """POST /v1/chunks: (status, index → (tier, frame)) from the streamed answer."""
        body = msgpack.packb([ref.pack() for ref in refs], use_bin_type=True)
        status, headers, raw = self.request("/v1/chunks", body, token=token, timeout=timeout)
        if status != 200:
            return status, {}
        items = {}
        for index, tier, frame in msgpack.Unpacker(io.BytesIO(raw), raw=False):
            if index == -1:  # a heartbeat while misses wait for the origin
                continue
            assert index not in items, f"index {index} answered twice"
            items[index] = (tier, frame)
        return status, items

    def status(self) -> dict[str, str]:
        """/proc status fields (VmRSS, VmHWM, …) of the node process."""
        assert self.proc is not None
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return fields

    def rss_mb(self, field: str = "VmHWM") -> float:
        return int(self.status()[field].split()[0]) / 1024

    def metric(self, name: str, labels: str = "") -> float:
        _, _, body = self.request("/metrics", token=None)
        return parse_exposition(body.decode()).get(f"{name}{{{labels}}}" if labels else name, 0.0)

    def wait_members(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.metric("peerpull_members") == count:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.node_id} never saw {count} members; log: {self.log_path.read_text()[-2000:]}")

    def warm(self, image: str) -> dict:
        """POST /v1/warm; the final line's report (the answer is NDJSON progress lines, then it)."""
        status, _, body = self.request("/v1/warm", json.dumps({"image": image}).encode(), timeout=600)
        assert status == 200, body
        last = json.loads(body.splitlines()[-1])
        assert last["event"] == "done", last
        return last["report"]

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and kill:
            self.proc.kill()
            self.proc.wait()
        stop_process(self.proc, 10)


def start_cluster(root: Path, count: int, extra_env: dict[str, str] | None = None) -> list[NodeProcess]:
    root.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(count)]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    nodes = [NodeProcess(root, f"node{i}", ports[i], [a for a in addresses if a != addresses[i]], extra_env).start()
             for i in range(count)]
    for node in nodes:
        node.wait_members(count)
    return nodes
