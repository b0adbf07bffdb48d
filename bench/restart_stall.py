"""The stall a reader sees across a live restart of the node daemon, and its read errors.

Builds a small synthetic image (small files and one large file), converts it into a private
registry, pulls it lazily into one `peerpull daemon` (kernel FUSE transport, fd holder on) and
keeps a reader going on the FUSE mount: 64 KiB reads at random offsets of the large file and whole
small files, each with its page cache dropped first so every read reaches the daemon (from its
memory or disk cache, or the registry the first time), every byte compared. Then, `--repeat`
times each:
  handover  a successor started with --takeover, SIGHUP to the running daemon (planned restart);
  crash     SIGKILL, then a new daemon that takes the connection from the fd holder and has the
            kernel resend what the dead one had read.
The stall is the longest single read during the restart; it is printed with the longest read of
an equally long quiet window before it (the same reader, no restart) as the ratio's base.

    bench/restart_stall.py [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peerpull.testbed.containerd import NAMESPACE, EmbeddedContainerd  # noqa: E402
from peerpull.testbed.daemon import EmbeddedDaemon  # noqa: E402
from peerpull.testbed.oci_layout import LayerSpec, write_layout  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402
from snapshotter.fs.fd_holder import holder_ping, holder_stop  # noqa: E402

CHUNK = 256 << 10
READ = 64 << 10
LARGE_MIB = 48
DAEMON_ENV = {"PEERPULL_SNAPSHOTTER_FD_HOLDER": "true", "PEERPULL_SNAPSHOTTER_KEEP_MOUNT_ON_STOP": "false",
              "PEERPULL_SNAPSHOTTER_FUSE_BACKEND": "kernel", "PEERPULL_SNAPSHOTTER_PREFETCH": "none",
              "PEERPULL_SNAPSHOTTER_STREAM": "never", "PEERPULL_SNAPSHOTTER_PROFILE_RECORD": "false",
              "PEERPULL_SNAPSHOTTER_PROFILE_FETCH": "false", "PEERPULL_SNAPSHOTTER_HANDOVER_TIMEOUT_S": "120"}
JSON_KEYS = ("handover_max_stall_s", "crash_max_stall_s", "restart_read_errors", "quiet_max_read_s")


def build_image(root: Path) -> dict[str, bytes]:
    rnd = random.Random(3)
    files = {f"app/m{i:03d}.py": rnd.randbytes(rnd.randint(200, 40_000)) for i in range(200)}
    files["data/large.bin"] = rnd.randbytes(LARGE_MIB << 20)
    layer = LayerSpec()
    for d in ("app", "data"):
        layer.add(d, type=tarfile.DIRTYPE)
    for name, data in files.items():
        layer.add(name, data)
    write_layout(root, [layer.tar_bytes()])
    return files


class Reader:
    """Reads from the mount in a thread of its own; the longest read since `window()`."""

    def __init__(self, layer_dir: Path, files: dict[str, bytes]) -> None:
        self.layer_dir, self.files = layer_dir, files
        self.errors: list[str] = []
        self.reads = 0
        self.longest_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def window(self) -> None:
        self.longest_s = 0.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(300)

    def _run(self) -> None:
        rnd = random.Random(9)
        small = [n for n in self.files if n.startswith("app/")]
        large = self.files["data/large.bin"]
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if self.reads % 2:
                    name = rnd.choice(small)
                    got = self._pread(name, 0, 1 << 20)
                    want = self.files[name]
                else:
                    offset = rnd.randrange(0, len(large) - READ)
                    name, got, want = "data/large.bin", self._pread("data/large.bin", offset, READ), large[offset:offset + READ]
                if got != want:
                    self.errors.append(f"{name}: bytes differ")
            except OSError as exc:
                self.errors.append(f"{name}: {exc!r}")
            self.longest_s = max(self.longest_s, time.monotonic() - started)
            self.reads += 1

    def _pread(self, name: str, offset: int, size: int) -> bytes:
        fd = os.open(self.layer_dir / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # to the daemon, not the page cache
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)


def crash_and_start(daemon: EmbeddedDaemon) -> None:
    ready = len(daemon.events("daemon_ready"))
    daemon.stop(kill=True)
    daemon.start(timeout_s=300)
    deadline = time.monotonic() + 300
    while len(daemon.events("daemon_ready")) <= ready:
        if time.monotonic() > deadline:
            raise SystemExit(f"the restarted daemon did not come up: {daemon.log_tail()}")
        time.sleep(0.05)


def settle(reader: Reader, seconds: float) -> None:
    """Let the reader go on for a while (the successor's first reads land in the window)."""
    reads = reader.reads
    time.sleep(seconds)
    while reader.reads < reads + 20:
        time.sleep(0.1)


def measure(work: Path, repeat: int = 3) -> dict[str, Any]:
    """Stalls across `repeat` handovers and `repeat` crashes; the JSON_KEYS figures plus raw lists."""
    files = build_image(work / "layout")
    stalls: dict[str, list[float]] = {"quiet": [], "handover": [], "crash": []}
    with EmbeddedRegistry(work / "registry") as registry:
        image = f"{registry.address}/bench/restart:1"
        subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "convert", "--quiet",
                        "--chunk-size", str(CHUNK), f"oci:{work / 'layout'}:latest", image], check=True, timeout=900)
        daemon = EmbeddedDaemon(work / "daemon", extra_env=DAEMON_ENV).start(timeout_s=300)
        try:
            with EmbeddedContainerd(work / "containerd", proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
                subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "pull", image, "--address",
                                str(ctrd.socket), "--namespace", NAMESPACE], check=True, timeout=900,
                               capture_output=True)
                layer_dir = next(p for p in daemon.fuse_mount.iterdir() if (p / "data" / "large.bin").exists())
                reader = Reader(layer_dir, files)
                try:
                    settle(reader, 3.0)
                    for i in range(repeat):
                        for kind in ("quiet", "handover", "crash"):
                            reader.window()
                            started = time.monotonic()
                            if kind == "handover":
                                daemon.hand_over(timeout_s=300)
                            elif kind == "crash":
                                crash_and_start(daemon)
                            else:
                                time.sleep(3.0)
                            settle(reader, 1.0)
                            stalls[kind].append(round(reader.longest_s, 3))
                            print(f"round {i + 1}: {kind:8} longest read {reader.longest_s:.3f} s "
                                  f"({time.monotonic() - started:.1f} s window), errors so far {len(reader.errors)}",
                                  flush=True)
                finally:
                    reader.close()
        finally:
            daemon.close()
            sock = daemon.sock_dir / "fd-holder.sock"
            if holder_ping(sock, 2.0) is not None:
                holder_stop(sock)
    return {"handover_max_stall_s": statistics.median(stalls["handover"]),
            "crash_max_stall_s": statistics.median(stalls["crash"]),
            "quiet_max_read_s": statistics.median(stalls["quiet"]),
            "restart_read_errors": len(reader.errors), "restart_reads": reader.reads,
            "restart_stalls": stalls, "restart_errors_sample": reader.errors[:5]}


def table(f: dict[str, Any]) -> str:
    base = f["quiet_max_read_s"] or 0.0
    lines = ["| reader across | longest read, median (range) | vs quiet window | read errors |", "|---|---|---|---|"]
    for kind, key in (("no restart (quiet)", "quiet"), ("planned handover", "handover"), ("crash (SIGKILL)", "crash")):
        values = f["restart_stalls"][key]
        median = statistics.median(values)
        ratio = f"{median / base:.1f}×" if base else "–"
        lines.append(f"| {kind} | {median:.3f} s ({min(values):.3f}–{max(values):.3f}) | {ratio} "
                     f"| {f['restart_read_errors'] if key != 'quiet' else ''} |")
    lines.append(f"\n{f['restart_reads']} reads, {f['restart_read_errors']} errors in all")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="handovers and crashes each (default 3)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("restart_stall needs root (FUSE, containerd)")
    with tempfile.TemporaryDirectory(prefix="peerpull-restart-", dir="/var/tmp") as tmp:
        figures = measure(Path(tmp), args.repeat)
    print("\n" + table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if figures["restart_read_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
