"""A private Distribution registry under a directory, on a loopback address: for the demo, quickstart,
benchmarks and tests. Never touches a system-wide registry.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from converter.format.errors import ConfigError, PeerpullError
from peerpull.testbed.process import spawn_logged, stop_process

REGISTRY_BINARIES = ("docker-registry", "registry")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_registry_binary() -> str:
    for name in REGISTRY_BINARIES:
        path = shutil.which(name)
        if path:
            return path
    raise ConfigError("no Distribution registry binary found: install the docker-registry package")


_ACCESS = re.compile(r'"GET /v2/(?P<repo>.+?)/blobs/sha256:[0-9a-f]{64} HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+)')


class EmbeddedRegistry:
    """`with EmbeddedRegistry(dir) as reg:` → a registry at `reg.address` until the block ends."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int | None = None,
                 extra_config: str = "", netns: str | None = None, probe_url: str | None = None) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port or free_port(host)
        self._probe_url = probe_url  # where readiness is checked when the host cannot reach `address` (a relay)
        self._extra = extra_config
        self._netns = netns  # run inside this network namespace (e.g. behind a rate-limited link)
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "registry.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _write_config(self) -> Path:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n"
            + self._extra
        )
        return config

    def start(self, timeout_s: float = 15.0) -> EmbeddedRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        cmd = [find_registry_binary(), "serve", str(config)]
        self._proc = spawn_logged(["ip", "netns", "exec", self._netns, *cmd] if self._netns else cmd, self.log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PeerpullError(f"registry exited at start; see {self.log_path}")
            try:
                urllib.request.urlopen((self._probe_url or self.url) + "/v2/", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # 401 from an auth-protected registry: it is up
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise PeerpullError(f"registry did not answer on {self.address} within {timeout_s:.0f} s; see {self.log_path}")

    def blob_bytes(self, repository: str | None = None) -> int:
        """Blob bytes this registry has sent so far (from its access log), for one repository or all."""
        return self.blob_requests(repository)[1]

    def blob_requests(self, repository: str | None = None) -> tuple[int, int]:
        """(successful blob GETs, blob bytes) this registry has served so far, from its access log."""
        count = total = 0
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return 0, 0
        for line in lines:
            m = _ACCESS.search(line)
            if m and (repository is None or m["repo"] == repository) and m["status"] in ("200", "206"):
                count += 1
                total += int(m["bytes"])
        return count, total

    def stop(self) -> None:
        stop_process(self._proc, 5)
        self._proc = None

    def __enter__(self) -> EmbeddedRegistry:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
