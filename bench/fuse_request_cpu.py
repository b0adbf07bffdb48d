"""Per-request daemon CPU of Python-served FUSE reads, kernel transport vs pyfuse3, in one run.

A server process mounts one layer holding one file whose bytes it keeps in memory (the cached-file
case without the chunk cache: what is measured is the transport and the filesystem core), and this
process reads it with 4 KiB O_DIRECT random reads, so every read is one READ request (the page
cache answers none). Daemon CPU is utime + stime of the server from /proc/<pid>/stat, divided by
the READ requests it served. `--block 1048576 --sequential` measures 1 MiB sequential reads
instead (MB/s through each transport). Numbers vary with the machine's load: compare the ratio.

    bench/fuse_request_cpu.py [--requests 20000] [--mib 64] [--block 4096] [--sequential] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converter.format import toc as fmt  # noqa: E402
from snapshotter.fs.fusefs import LayerFS  # noqa: E402

LAYER = "sha256:" + "cd" * 32
BLOCK = 4096


class InMemory(LayerFS):
    """One file `data`, served from memory."""

    content = b""
    reads = 0

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.reads += 1
        return self.content[off:off + size]


def serve(backend: str, mountpoint: str, size: int) -> None:
    from peerpull.config import LogConfig
    from peerpull.logs import configure_logging
    from snapshotter.fs.mount import open_mount

    configure_logging(LogConfig(level="warning", format="json"))  # on stderr: stdout says `ready`

    chunk = 1 << 20
    chunks = [fmt.Chunk(o, min(chunk, size - o), o, min(chunk, size - o), b"\0" * 32) for o in range(0, size, chunk)]
    toc = fmt.Toc(chunk, [fmt.TocEntry(path=".", type=fmt.DIR, mode=0o755),
                          fmt.TocEntry(path="data", type=fmt.FILE, mode=0o644, size=size, chunks=chunks)])
    fs = InMemory(None)  # type: ignore[arg-type]  # no chunk reader: read() answers from memory
    fs.content = random.Random(1).randbytes(size)
    fs.add_layer(LAYER, 1, "bench/fuse", toc)

    async def run() -> None:
        mount = open_mount(fs, Path(mountpoint), backend, 64, 128)
        serving = asyncio.ensure_future(mount.serve())
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(mount.stop(serving)))
        print("ready", flush=True)
        try:
            await serving
        finally:
            mount.close()
        print(fs.reads, flush=True)

    asyncio.run(run())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(backend: str, root: Path, requests: int, size: int, block: int, sequential: bool) -> dict[str, object]:
    point = root / f"mnt-{backend}"
    point.mkdir(parents=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", backend, str(point), str(size)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        raise SystemExit(f"the {backend} server did not mount")
    path = point / LAYER.split(":", 1)[1] / "data"
    buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
    rnd = random.Random(2)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buffer], 0)  # warm-up: open, lookups, first request
        before, started = cpu_seconds(server.pid), time.monotonic()
        blocks = size // block
        for i in range(requests):
            os.preadv(fd, [buffer], (i % blocks if sequential else rnd.randrange(blocks)) * block)
        seconds = time.monotonic() - started
        cpu = cpu_seconds(server.pid) - before
    finally:
        os.close(fd)
        server.send_signal(signal.SIGTERM)
        served = int(server.stdout.read().split()[-1])
        server.wait(60)
    per_us = 1e6 * cpu / requests
    print(f"{backend:8} {requests:7d} reads  {served:7d} served  cpu {cpu:6.2f} s  wall {seconds:6.2f} s  "
          f"{per_us:6.1f} us cpu/request  {requests / seconds:8.0f} reads/s  {requests * block / seconds / 1e6:8.1f} MB/s")
    return {"backend": backend, "requests": requests, "served": served, "block": block, "sequential": sequential,
            "cpu_s": round(cpu, 3), "wall_s": round(seconds, 3), "cpu_us_per_request": round(per_us, 2),
            "reads_per_s": round(requests / seconds), "mb_per_s": round(requests * block / seconds / 1e6, 1)}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--block", type=int, default=BLOCK, help="bytes per read (a multiple of 4096)")
    parser.add_argument("--sequential", action="store_true", help="read the file in order, not at random")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per backend; the best counts")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("fuse_request_cpu needs root (FUSE mounts)")
    with tempfile.TemporaryDirectory(prefix="peerpull-fusecpu-") as tmp:
        runs = [measure(b, Path(tmp) / f"r{i}", args.requests, args.mib << 20, args.block, args.sequential)
                for i in range(args.rounds) for b in ("pyfuse3", "kernel")]
    # the least CPU per request of each backend: other load on the machine only ever adds to it
    best = {b: min((r for r in runs if r["backend"] == b), key=lambda r: r["cpu_us_per_request"])  # type: ignore[arg-type, return-value]
            for b in ("pyfuse3", "kernel")}
    ratio = best["pyfuse3"]["cpu_us_per_request"] / best["kernel"]["cpu_us_per_request"]  # type: ignore[operator]
    print(f"best of {args.rounds}: pyfuse3 {best['pyfuse3']['cpu_us_per_request']} us, kernel "
          f"{best['kernel']['cpu_us_per_request']} us cpu/request; pyfuse3 / kernel: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "best": best, "pyfuse3_over_kernel": round(ratio, 2)},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
