"""A private containerd instance under a directory (its own root, state and socket), driven with `ctr`.

Never the host's containerd: everything lives under `root`, and stop() unmounts what this
instance left mounted there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from converter.format.errors import ConfigError, PeerpullError
from peerpull.testbed.process import spawn_logged, stop_process, unmount_under

NAMESPACE = "peerpull"
# The CRI plugin's ids per config version: 2.x split it in three (2.x still has the grpc one, for streaming).
CRI_PLUGINS = {2: ("io.containerd.grpc.v1.cri",),
               3: ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime")}


class EmbeddedContainerd:
    def __init__(self, root: Path, proxy_plugins: dict[str, str] | None = None, enable_cri: bool = False,
                 extra_config: str = "", on_spawn: Callable[[int], None] | None = None,
                 netns: str | None = None, bin_dir: Path | None = None, config_version: int = 2) -> None:
        if config_version not in CRI_PLUGINS:
            raise ConfigError(f"containerd config version {config_version}: expected 2 (1.x) or 3 (2.x)")
        self.root = Path(root)
        self.socket = self.root / "containerd.sock"
        self.ttrpc_socket = self.root / "containerd-ttrpc.sock"
        self.log_path = self.root / "containerd.log"
        self._proxy_plugins = proxy_plugins or {}
        self._enable_cri = enable_cri
        self._extra = extra_config
        self._proc: subprocess.Popen[bytes] | None = None
        self._on_spawn = on_spawn  # told the PID at once (peerpull run records it for peerpull clean)
        self._netns = netns  # a network namespace (its network only: mounts stay visible to the host)
        # another release's containerd, ctr and shims (scripts/containerd_versions.sh); None: the PATH's
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.config_version = config_version

    def tool(self, name: str) -> str:
        """`containerd`, `ctr`, ... of this instance's release."""
        return str(self.bin_dir / name) if self.bin_dir is not None else name

    def config_text(self) -> str:
        disabled = [] if self._enable_cri else [f'"{p}"' for p in CRI_PLUGINS[self.config_version]]
        lines = [
            f"version = {self.config_version}",
            f'root = "{self.root / "root"}"',
            f'state = "{self.root / "state"}"',
            f"disabled_plugins = [{', '.join(disabled)}]",
            "[grpc]",
            f'  address = "{self.socket}"',
            "[ttrpc]",
            f'  address = "{self.ttrpc_socket}"',
            "[debug]",
            '  level = "info"',
        ]
        for name, address in self._proxy_plugins.items():
            lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"', f'  address = "{address}"']
        return "\n".join(lines) + "\n" + self._extra

    def start(self, timeout_s: float = 30.0) -> EmbeddedContainerd:
        for tool in (self.tool("containerd"), self.tool("ctr"), "runc"):
            if shutil.which(tool) is None:
                raise ConfigError(f"{tool} not found: install the containerd and runc packages")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"
        config.write_text(self.config_text())
        cmd = [self.tool("containerd"), "--config", str(config)]
        if self._netns:
            cmd = ["nsenter", f"--net=/run/netns/{self._netns}", "--", *cmd]
        env = None
        if self.bin_dir is not None:  # containerd starts the shim it finds first on PATH: its own release's
            env = {**os.environ, "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        self._proc = spawn_logged(cmd, self.log_path, env=env)
        if self._on_spawn is not None:
            self._on_spawn(self._proc.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PeerpullError(f"containerd exited at start; see {self.log_path}")
            if self.socket.exists() and self.ctr("version", check=False, timeout=5).returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise PeerpullError(f"containerd did not come up within {timeout_s:.0f} s; see {self.log_path}")

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `ctr` against this instance, in the peerpull namespace."""
        cmd = [self.tool("ctr"), "--address", str(self.socket), "--namespace", NAMESPACE, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise PeerpullError(f"ctr {' '.join(args[:3])} failed: {result.stderr.strip()[-500:]}")
        return result

    def stop(self) -> None:
        stop_process(self._proc, 10)
        self._proc = None
        # only mounts under our own root: overlay rootfs of containers that did not exit cleanly
        unmount_under(str(self.root.resolve()))

    def __enter__(self) -> EmbeddedContainerd:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
