"""Per-read daemon CPU: what a read costs the node daemon, cold, warm from its disk cache, and when
it serves every chunk to another node.

Builds a synthetic image (a few thousand small files and a few large ones), converts it into a
private registry, pulls it lazily through a private containerd into one `peerpull daemon`, then:
  cold   every file read once through the FUSE mount (chunks come from the registry);
  warm   the page cache dropped, the daemon restarted (empty memory cache, chunks on its disk
         cache) and the image pulled again, every file read again;
  serve  another node's peer client asks the daemon for every chunk (batched, as a node does);
         MiB here is the compressed bytes sent.
It prints daemon CPU seconds (utime + stime from /proc/<pid>/stat) per MiB and per file (per chunk
for serve). Run it on two commits to compare; numbers vary with the machine's load.

    bench/read_cpu.py [--small-files 3000] [--large-files 4] [--large-mib 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peerpull.testbed.containerd import NAMESPACE, EmbeddedContainerd  # noqa: E402
from peerpull.testbed.daemon import EmbeddedDaemon  # noqa: E402
from peerpull.testbed.oci_layout import LayerSpec, write_layout  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402

CHUNK = 1 << 20
DAEMON_ENV = {"PEERPULL_SNAPSHOTTER_MEMORY_CACHE_BYTES": str(16 << 20),  # the warm pass reads the disk cache
              "PEERPULL_SNAPSHOTTER_PREFETCH": "none"}  # each read costs what it reads, nothing ahead


def build_image(root: Path, small: int, large: int, large_mib: int) -> None:
    rnd = random.Random(7)
    code = LayerSpec()
    code.add("app", type=tarfile.DIRTYPE)
    for i in range(small):  # source-like: compressible text of 200 B to 24 KiB
        words = [rnd.choice(("def ", "return ", "import ", "self.", "value", "(x)", "\n    ", "0", "#"))
                 for _ in range(rnd.randint(30, 4000))]
        code.add(f"app/m{i:05d}.py", "".join(words).encode()[: rnd.randint(200, 24_000)])
    data = LayerSpec()
    data.add("data", type=tarfile.DIRTYPE)
    for i in range(large):  # half random, half repetitive: some work for zstd either way
        half = (large_mib << 20) // 2
        data.add(f"data/big{i}.bin", rnd.randbytes(half) + bytes(range(256)) * (half // 256))
    write_layout(root, [code.tar_bytes(), data.tar_bytes()])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def peerpull(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", *args],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"peerpull {' '.join(args)} failed: {result.stderr[-2000:]}")
    return result.stdout


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_every_file(mount: Path) -> tuple[int, int]:
    """(files, bytes) read through the FUSE mount's layer directories."""
    files = total = 0
    for dirpath, _, names in os.walk(mount):
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    total += len(block)
            files += 1
    return files, total


def measured(daemon: EmbeddedDaemon, work: Callable[[], Any]) -> tuple[float, float, Any]:
    assert daemon.pid is not None
    before, started = cpu_seconds(daemon.pid), time.monotonic()
    result = work()
    return cpu_seconds(daemon.pid) - before, time.monotonic() - started, result


def pull(ctrd: EmbeddedContainerd, image: str) -> None:
    peerpull("pull", image, "--address", str(ctrd.socket), "--namespace", NAMESPACE, "--json")


async def serve_all(address: str, image: str) -> int:
    """Every chunk of `image` asked from the node at `address` by a peer client, verified here."""
    import aiohttp

    from converter.format.layer_reader import decompress_chunk
    from converter.registry.client import RegistryClient
    from converter.registry.config import RegistryConfig
    from peer.client import PeerClient
    from peer.warm import image_chunks

    async with RegistryClient(RegistryConfig()) as registry:
        refs, _ = await image_chunks(registry, image)
    async with aiohttp.ClientSession() as session:
        client = PeerClient(session, "", 120.0)
        frames = await asyncio.gather(*(client.fetch_frame(address, r) for r in refs))
    for ref, (frame, _) in zip(refs, frames):
        decompress_chunk(frame, ref.as_chunk()._replace(compressed_length=len(frame)))
    return len(refs)


def origin_chunks(daemon: EmbeddedDaemon) -> float:
    return daemon.metrics().get('peerpull_chunk_requests_total{tier="origin"}', 0.0)


def row(name: str, cpu: float, seconds: float, mib: float, count: int, unit: str) -> dict[str, object]:
    per_mib = round(1000 * cpu / mib, 2) if mib else None
    per_item = round(1000 * cpu / count, 3) if count else None
    one = unit.rstrip("s")
    print(f"{name:5}  cpu {cpu:7.3f} s  wall {seconds:6.2f} s  {mib:7.1f} MiB  {count:6d} {unit:6}"
          f"  {per_mib} ms/MiB  {per_item} ms/{one}")
    return {"pass": name, "cpu_s": round(cpu, 3), "wall_s": round(seconds, 2), "mib": round(mib, 1), unit: count,
            "cpu_ms_per_mib": per_mib, f"cpu_ms_per_{one}": per_item}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-files", type=int, default=3000)
    parser.add_argument("--large-files", type=int, default=4)
    parser.add_argument("--large-mib", type=int, default=16)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("read_cpu needs root (FUSE, containerd, dropping the page cache)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="peerpull-readcpu-") as tmp:
        root = Path(tmp)
        build_image(root / "layout", args.small_files, args.large_files, args.large_mib)
        with EmbeddedRegistry(root / "registry") as registry:
            image = f"{registry.address}/bench/readcpu:1"
            peerpull("convert", "--quiet", "--chunk-size", str(CHUNK), f"oci:{root / 'layout'}:latest", image)
            daemon = EmbeddedDaemon(root / "daemon", extra_env=DAEMON_ENV).start()
            try:
                with EmbeddedContainerd(root / "containerd", proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
                    pull(ctrd, image)
                    drop_page_cache()
                    cpu, seconds, (files, total) = measured(daemon, lambda: read_every_file(daemon.fuse_mount))
                    rows.append(row("cold", cpu, seconds, total / (1 << 20), files, "files"))
                daemon.stop()  # the memory cache goes; the disk cache stays
                subprocess.run(["umount", "-l", str(daemon.fuse_mount)], capture_output=True)
                drop_page_cache()
                daemon.start()
                # a new containerd: the old one's connection to the stopped daemon's socket backs off
                with EmbeddedContainerd(root / "containerd2", proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
                    pull(ctrd, image)
                    before = origin_chunks(daemon)
                    cpu, seconds, (files, total) = measured(daemon, lambda: read_every_file(daemon.fuse_mount))
                    rows.append(row("warm", cpu, seconds, total / (1 << 20), files, "files"))
                    rows[-1]["origin_chunks"] = origin_chunks(daemon) - before  # 0: all from the disk cache
                    drop_page_cache()
                    cpu, seconds, chunks = measured(daemon, lambda: asyncio.run(serve_all(daemon.peer_address, image)))
                    served = daemon.metrics().get("peerpull_served_bytes_total", 0.0)
                    rows.append(row("serve", cpu, seconds, served / (1 << 20), int(chunks), "chunks"))
            finally:
                daemon.close()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
