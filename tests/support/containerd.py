"""A private containerd for tests, and helpers to pull and run images with `ctr`.

Never the host's containerd: root, state, config, log and sockets are this instance's own, and
stop() kills only the tasks and shims of this instance and unmounts only under its directories.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Self

from peerpull.testbed.containerd import EmbeddedContainerd

NAMESPACE = "peerpull-test"
_SUN_PATH_MAX = 100  # a unix socket path must fit sockaddr_un.sun_path (108 bytes with the NUL)
_ids = itertools.count()


class CtrError(RuntimeError):
    """A `ctr` command failed; the message carries its stderr."""


class ContainerdProcess(EmbeddedContainerd):
    """`with ContainerdProcess(tmp / "containerd") as ctrd: ctrd.ctr("images", "ls")`.

    `proxy_plugins` maps a snapshotter name to its gRPC socket ([proxy_plugins.<name>]);
    `enable_cri` keeps the CRI plugin (disabled by default: it is slow to start and unused);
    `extra_config` is appended to config.toml verbatim; `bin_dir` holds another release's binaries
    (containerd, ctr, shims: scripts/containerd_versions.sh) and `config_version` is 3 for 2.x.
    """

    def __init__(self, root: Path, proxy_plugins: dict[str, str] | None = None, enable_cri: bool = False,
                 extra_config: str = "", bin_dir: Path | None = None, config_version: int = 2) -> None:
        super().__init__(root, proxy_plugins=proxy_plugins, enable_cri=enable_cri, extra_config=extra_config,
                         bin_dir=bin_dir, config_version=config_version)
        self.root = Path(root).absolute()
        self.log_path = self.root / "containerd.log"
        # pytest's tmp paths can be too long for a socket: then the sockets go to a short private dir.
        self._short_dir: Path | None = None
        if len(str(self.root / "containerd-ttrpc.sock")) > _SUN_PATH_MAX:
            self._short_dir = Path(tempfile.mkdtemp(prefix="ppctd-", dir="/run" if os.access("/run", os.W_OK) else None))
        sockets = self._short_dir or self.root
        self.socket = sockets / "containerd.sock"
        self.ttrpc_socket = sockets / "containerd-ttrpc.sock"

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start containerd and wait until `ctr version` answers; cleans up if it does not."""
        try:
            super().start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Self:
        return self.start()

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`ctr --address <sock> --namespace peerpull-test <args>`; raises CtrError with stderr if check."""
        cmd = [self.tool("ctr"), "--address", str(self.socket), "--namespace", NAMESPACE, *args]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise CtrError(f"ctr {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-4000:]}"
                           f"\nstdout tail: {result.stdout[-1000:]}")
        return result

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._kill_tasks()
        super().stop()  # SIGTERM containerd, then lazily unmount what is left under self.root
        self._kill_own_shims()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)

    def _kill_tasks(self) -> None:
        # Tasks of a failed test would outlive containerd in their shims: end them while it can.
        listed = self.ctr("tasks", "ls", "-q", check=False, timeout=30)
        for task in listed.stdout.split():
            self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False, timeout=30)
            self.ctr("tasks", "delete", "-f", task, check=False, timeout=30)

    def _kill_own_shims(self) -> None:
        # A shim names the containerd socket it serves in its arguments: kill exactly ours, by pid.
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(self.socket).encode() in argv:
                try:
                    os.kill(int(entry.name), 9)
                except ProcessLookupError:
                    pass


def pull_image(ctrd: ContainerdProcess, image_ref: str, snapshotter: str | None = None,
               plain_http: bool = True) -> None:
    """`ctr images pull` (and unpack for `snapshotter`, default overlayfs)."""
    args = ["images", "pull", *(["--plain-http"] if plain_http else []),
            *(["--snapshotter", snapshotter] if snapshotter else []), image_ref]
    ctrd.ctr(*args, timeout=600)


def run_container(ctrd: ContainerdProcess, image_ref: str, args: list[str], snapshotter: str | None = None,
                  timeout: float = 300) -> str:
    """Run `args` in a fresh container of `image_ref` and return its stdout; CtrError on a non-zero exit.

    `ctr run` replaces the image's Entrypoint and Cmd with `args` (an empty `args` runs them).
    The container gets its own network namespace with loopback only (no CNI).
    """
    container_id = f"pp-{next(_ids)}-{uuid.uuid4().hex[:8]}"
    snap = ["--snapshotter", snapshotter] if snapshotter else []
    # runc's state goes under our root too, not /run/containerd/runc/<namespace>.
    runc_root = ["--runc-root", str(ctrd.root / "runc")]
    return ctrd.ctr("run", "--rm", *runc_root, *snap, image_ref, container_id, *args, timeout=timeout).stdout
