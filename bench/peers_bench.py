"""Peer benchmark: N nodes warm the same image at once; registry egress stays ~1× the image.

For N in --nodes (default 1 2 4 8) node processes on loopback, every node warms every chunk of the
realistic seekable image at the same moment. Egress is summed from the registry's own access log.
Then one node's peer serving throughput: another node's peer client (the fetcher's own path: one
`fetch_frame` per chunk, batched and pipelined by the client) asks for every chunk the node holds,
`--serve-repeat` times with the node's cache files dropped from the page cache first ("cold", read
from the disk) and as many times with them in the page cache ("warm"). It is compared, in the same
run, with the serving node's disk read rate (its cache files read sequentially after dropping them
from the page cache, with posix_fadvise: nobody else's page cache is touched), the page-cache read
rate of the same files, and the node's link (loopback TCP between two processes). Every frame
received is checked afterwards against its digest (decompressed, sha256), outside the timing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import zstandard  # noqa: E402
from realistic_image import build_realistic_image  # noqa: E402

from converter.registry.client import RegistryClient  # noqa: E402
from converter.registry.config import RegistryConfig  # noqa: E402
from peer.client import PeerClient, PeerFetchError  # noqa: E402
from peer.warm import image_chunks  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402
from tests.support.peer_cluster import TOKEN, start_cluster  # noqa: E402

_ACCESS = re.compile(r'"GET /v2/[^ ]+/blobs/sha256:[0-9a-f]{64} HTTP/[0-9.]+" (?:200|206) (\d+)')


def registry_egress(log: Path, start_offset: int) -> int:
    with open(log, "rb") as f:
        f.seek(start_offset)
        text = f.read().decode(errors="replace")
    return sum(int(m.group(1)) for m in _ACCESS.finditer(text))


async def chunk_refs(image: str):
    async with RegistryClient(RegistryConfig()) as client:
        return (await image_chunks(client, image))[0]


async def serve_throughput(address: str, refs: list) -> tuple[int, float, list[bytes]]:
    """Compressed bytes a node serves to another node's peer client asking for every chunk it
    holds (one fetch_frame per chunk, as the fetcher does: the client batches and pipelines)."""
    async with aiohttp.ClientSession() as session:
        # a generous idle timeout: on a loaded machine the asking loop itself may stall for seconds
        client = PeerClient(session, TOKEN, 300.0, read_timeout_s=60.0)
        started = time.monotonic()
        frames = await asyncio.gather(*(client.fetch_frame(address, r) for r in refs))
        seconds = time.monotonic() - started
    assert all(tier == "cache" for _, tier in frames)
    return sum(len(f) for f, _ in frames), seconds, [f for f, _ in frames]


def check_frames(refs: list, frames: list[bytes]) -> int:
    """How many frames do not decompress to their digest (the receiver's check, outside the timing)."""
    dctx = zstandard.ZstdDecompressor()
    bad = 0
    for ref, frame in zip(refs, frames):
        data = dctx.decompress(frame, max_output_size=ref.length)
        bad += "sha256:" + hashlib.sha256(data).hexdigest() != ref.digest
    return bad


def cache_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def drop_from_page_cache(paths: list[Path]) -> None:
    """Only these files leave the page cache (fadvise): the machine's other work keeps its own.
    (Pages the node's SQLite has mapped, up to its 64 MiB mmap, stay: the kernel keeps mapped pages.)"""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(paths: list[Path]) -> tuple[int, float]:
    started, total = time.monotonic(), 0
    buffer = bytearray(1 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total, time.monotonic() - started


def _link_sender(port: int, total: int) -> None:
    block = memoryview(os.urandom(1 << 20))
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        while sent < total:
            s.sendall(block)
            sent += len(block)


def link_throughput(total: int = 2 << 30) -> tuple[int, float]:
    """Loopback TCP, one process to another: the link the nodes of this benchmark share."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = multiprocessing.get_context("spawn").Process(target=_link_sender,
                                                              args=(server.getsockname()[1], total))
        sender.start()
        conn, _ = server.accept()
        buffer = bytearray(1 << 20)
        got, started = 0, time.monotonic()
        with conn:
            while got < total and (n := conn.recv_into(buffer)):
                got += n
        seconds = time.monotonic() - started
        sender.join()
    return got, seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rate(measure: tuple[int, float] | tuple[int, float, list[bytes]]) -> float:
    return measure[0] / 1e6 / measure[1] if measure[1] else 0.0


def measure_serving(node_root: Path, address: str, pid: int, refs: list, repeat: int) -> dict[str, float]:
    """Median MB/s of frames served cold and warm, the disk, page-cache and link rates, the ratios,
    and the CPU both sides spent per MB (a figure the other work on a loaded machine moves less)."""
    files = cache_files(node_root)
    cold, warm, disk, page, server_cpu, client_cpu = [], [], [], [], [], []

    stalls: list[str] = []

    def serve_once() -> tuple[float, int]:
        for _ in range(3):  # a run whose request stalls (no byte for 60 s) is counted, then run again
            server, client = cpu_seconds(pid), time.process_time()
            try:
                served = asyncio.run(serve_throughput(address, refs))
                break
            except PeerFetchError as exc:
                stalls.append(str(exc))
                print(f"[bench] serving run failed, run again: {exc}", file=sys.stderr)
        else:
            raise SystemExit("bench: three serving runs in a row failed")
        server_cpu.append((cpu_seconds(pid) - server) * 1e3 / (served[0] / 1e6))
        client_cpu.append((time.process_time() - client) * 1e3 / (served[0] / 1e6))
        return rate(served), check_frames(refs, served[2])

    for _ in range(repeat):
        drop_from_page_cache(files)
        disk.append(rate(read_files(files)))
        page.append(rate(read_files(files)))
        drop_from_page_cache(files)
        mb_s, bad = serve_once()
        cold.append(mb_s)
        mb_s, more = serve_once()
        warm.append(mb_s)
        bad += more
        if bad:
            raise SystemExit(f"bench: {bad} frames served did not match their digest")
    link = statistics.median(rate(link_throughput()) for _ in range(repeat))
    out = {"serve_cold_mb_per_s": statistics.median(cold), "serve_warm_mb_per_s": statistics.median(warm),
           "disk_read_mb_per_s": statistics.median(disk), "page_cache_read_mb_per_s": statistics.median(page),
           "link_mb_per_s": link, "chunks": len(refs),
           "serve_cold_runs": [round(x, 1) for x in cold], "serve_warm_runs": [round(x, 1) for x in warm],
           "failed_runs": stalls, "server_cpu_ms_per_mb": statistics.median(server_cpu), "client_cpu_ms_per_mb": statistics.median(client_cpu)}
    out["cold_ratio"] = out["serve_cold_mb_per_s"] / min(out["disk_read_mb_per_s"], link)
    out["warm_ratio"] = out["serve_warm_mb_per_s"] / min(out["page_cache_read_mb_per_s"], link)
    return out


def print_serving(s: dict[str, float], image_bytes: int) -> None:
    chunks = s["chunks"]
    print(f"\npeer serving, one node to another, {chunks:,} chunks, {image_bytes / 1e6:,.0f} MB of frames "
          "(medians; MB/s of compressed frames):")
    print(f"{'cache files':>12}  {'served MB/s':>11}  {'chunks/s':>9}  {'disk MB/s':>10}  {'link MB/s':>10}"
          f"  {'served ÷ min(disk, link)':>24}")
    for label, served, disk, ratio in (("cold (disk)", s["serve_cold_mb_per_s"], s["disk_read_mb_per_s"], s["cold_ratio"]),
                                       ("page cache", s["serve_warm_mb_per_s"], s["page_cache_read_mb_per_s"], s["warm_ratio"])):
        per_s = chunks * served * 1e6 / image_bytes
        print(f"{label:>12}  {served:>11,.0f}  {per_s:>9,.0f}  {disk:>10,.0f}  {s['link_mb_per_s']:>10,.0f}  {ratio:>24.2f}")
    print(f"(runs, cold: {s['serve_cold_runs']}; warm: {s['serve_warm_runs']}; failed and run again: "
          f"{len(s['failed_runs'])})")
    print(f"CPU per MB of frames (median of every run): serving node {s['server_cpu_ms_per_mb']:.2f} ms, "
          f"asking client {s['client_cpu_ms_per_mb']:.2f} ms (the client's includes aiohttp and the BatchQueue, "
          "not verification)")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default="/var/cache/peerpull-bench", help="realistic image cache (%(default)s)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8], help="cluster sizes (default 1 2 4 8)")
    parser.add_argument("--format-version", choices=("1", "2"), default=None,
                        help="convert with this seekable format (1: one frame per small file, the many-small-"
                             "chunks case; default: the converter's own)")
    parser.add_argument("--serve-repeat", type=int, default=3, metavar="K",
                        help="serving measured K times, cold and warm; medians printed (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()

    layout, _ = build_realistic_image(Path(args.cache_dir))
    work = Path(tempfile.mkdtemp(prefix="peerpull-bench-peers-"))
    python = [sys.executable, "-m", "peerpull", "--log-level", "warning"]
    rows: list[dict[str, float | int]] = []
    serve: dict[str, float] = {}
    try:
        with EmbeddedRegistry(work / "registry") as registry:
            subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest",
                            f"docker://{registry.address}/bench/torch:gzip"], check=True)
            image = f"{registry.address}/bench/torch:seekable"
            version = ["--format-version", args.format_version] if args.format_version else []
            subprocess.run([*python, "convert", "--quiet", *version, f"{registry.address}/bench/torch:gzip", image],
                           check=True)
            refs = asyncio.run(chunk_refs(image))
            image_bytes = sum(r.compressed_length for r in refs)
            print(f"[bench] image: {len(refs):,} chunks, {image_bytes / 1e6:,.0f} MB of frames", file=sys.stderr)
            for count in args.nodes:
                nodes = start_cluster(work / f"n{count}", count,
                                      extra_env={"PEERPULL_PEER_TRUSTED_REGISTRIES": registry.address})
                try:
                    offset = registry.log_path.stat().st_size
                    started = time.monotonic()
                    with ThreadPoolExecutor(count) as pool:
                        reports = list(pool.map(lambda n: n.warm(image), nodes))
                    seconds = time.monotonic() - started
                    time.sleep(0.5)  # let the registry flush its access log
                    egress = registry_egress(registry.log_path, offset)
                    total = sum(int(r["bytes"]) for r in reports)
                    rows.append({"nodes": count, "egress_ratio": round(egress / image_bytes, 3),
                                 "egress_bytes": egress, "seconds": round(seconds, 2),
                                 "aggregate_mb_per_s": round(total / 1e6 / seconds, 1)})
                    print(f"[bench] {count} node(s): egress {egress / image_bytes:.3f}× in {seconds:.1f} s", file=sys.stderr)
                    if count == args.nodes[0]:
                        assert nodes[0].proc is not None
                        serve = measure_serving(work / f"n{count}" / nodes[0].node_id, nodes[0].address,
                                                nodes[0].proc.pid, refs, args.serve_repeat)
                finally:
                    for node in nodes:
                        node.stop()
                    shutil.rmtree(work / f"n{count}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'nodes':>5}  {'registry egress ÷ image':>24}  {'ordinary pull (N×)':>18}  {'aggregate MB/s':>14}  {'time':>7}")
    for row in rows:
        print(f"{row['nodes']:>5}  {row['egress_ratio']:>24.3f}  {row['nodes']:>18.1f}  {row['aggregate_mb_per_s']:>14.0f}"
              f"  {row['seconds']:>6.1f}s")
    print_serving(serve, image_bytes)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "serving": serve}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
