"""Peer benchmark: N nodes warm the same image at once; registry egress stays ~1× the image.

For N in --nodes (default 1 2 4 8) node processes on loopback, every node warms every chunk of the
realistic seekable image at the same moment. Egress is summed from the registry's own access log.
Then one node's peer serving throughput (all chunks, compressed frames, 16 requests in flight)
is measured next to a plain read of the same layer bytes from a local file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
from realistic_image import build_realistic_image  # noqa: E402

from converter.registry.client import RegistryClient  # noqa: E402
from converter.registry.config import RegistryConfig  # noqa: E402
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


async def serve_throughput(address: str, refs: list) -> tuple[int, float]:
    """Compressed bytes/s a node serves to another node's client asking for every chunk it holds
    (batched requests, verified on arrival like the fetcher does)."""
    from peer.client import PeerClient

    async with aiohttp.ClientSession() as session:
        client = PeerClient(session, TOKEN, 60.0)
        started = time.monotonic()
        frames = await asyncio.gather(*(client.fetch_frame(address, r) for r in refs))
        seconds = time.monotonic() - started
    assert all(tier == "cache" for _, tier in frames)
    return sum(len(f) for f, _ in frames), seconds


def local_read_throughput(paths: list[Path]) -> tuple[int, float]:
    for path in paths:  # once to get them into the page cache, as the node's cache files are
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    started, total = time.monotonic(), 0
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                total += len(block)
    return total, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default="/var/cache/peerpull-bench", help="realistic image cache (%(default)s)")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8], help="cluster sizes (default 1 2 4 8)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()

    layout, _ = build_realistic_image(Path(args.cache_dir))
    work = Path(tempfile.mkdtemp(prefix="peerpull-bench-peers-"))
    python = [sys.executable, "-m", "peerpull", "--log-level", "warning"]
    rows: list[dict[str, float | int]] = []
    serve: tuple[int, float] = (0, 0.0)
    try:
        with EmbeddedRegistry(work / "registry") as registry:
            subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest",
                            f"docker://{registry.address}/bench/torch:gzip"], check=True)
            image = f"{registry.address}/bench/torch:seekable"
            subprocess.run([*python, "convert", "--quiet", f"{registry.address}/bench/torch:gzip", image], check=True)
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
                        serve = asyncio.run(serve_throughput(nodes[0].address, refs))
                finally:
                    for node in nodes:
                        node.stop()
                    shutil.rmtree(work / f"n{count}", ignore_errors=True)
            blobs = sorted((registry.root / "storage").rglob("data"), key=lambda p: p.stat().st_size)[-2:]
            local = local_read_throughput(blobs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    peer_mb_s = serve[0] / 1e6 / serve[1] if serve[1] else 0.0
    local_mb_s = local[0] / 1e6 / local[1] if local[1] else 0.0
    print(f"{'nodes':>5}  {'registry egress ÷ image':>24}  {'ordinary pull (N×)':>18}  {'aggregate MB/s':>14}  {'time':>7}")
    for row in rows:
        print(f"{row['nodes']:>5}  {row['egress_ratio']:>24.3f}  {row['nodes']:>18.1f}  {row['aggregate_mb_per_s']:>14.0f}"
              f"  {row['seconds']:>6.1f}s")
    print(f"peer serving, one node: {peer_mb_s:,.0f} MB/s of frames  |  local file read of the same layers: "
          f"{local_mb_s:,.0f} MB/s  |  ratio {peer_mb_s / local_mb_s if local_mb_s else 0:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "peer_serve_mb_per_s": round(peer_mb_s, 1),
                                               "local_read_mb_per_s": round(local_mb_s, 1)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
