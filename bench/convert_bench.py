"""Conversion benchmark: peerpull convert vs `skopeo copy` recompressing to zstd, same image, same run.

Prints a table; `--json FILE` also writes the figures. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realistic_image import build_realistic_image  # noqa: E402

from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402

ESTARGZ_REFERENCE_MB_S = 8.0  # ctr-remote image convert --estargz, 1.5 GB PyTorch image, this machine class


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; (wall seconds, peak RSS in MB of the child)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:3])} failed: {stderr.strip()[-600:]}")
    return seconds, usage.ru_maxrss / 1024


def image_bytes(peerpull: list[str], ref: str) -> dict:
    out = subprocess.run([*peerpull, "inspect", "--json", ref], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default="/var/cache/peerpull-bench",
                        help="where the realistic image is built once and kept (default %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--chunk-size", default="1MiB", help="peerpull chunk size (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the registry directory afterwards")
    args = parser.parse_args()

    layout, uncompressed = build_realistic_image(Path(args.cache_dir))
    peerpull = [sys.executable, "-m", "peerpull", "--log-level", "warning"]
    work = Path(tempfile.mkdtemp(prefix="peerpull-bench-"))
    with EmbeddedRegistry(work / "registry") as registry:
        base = f"{registry.address}/bench/torch"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest",
                        f"docker://{base}:gzip"], check=True)
        print("[bench] converting with peerpull …", file=sys.stderr)
        convert_s, convert_rss = timed([*peerpull, "convert", "--quiet", "--chunk-size", args.chunk_size,
                                        f"{base}:gzip", f"{base}:seekable"])
        print("[bench] recompressing with skopeo (zstd) …", file=sys.stderr)
        # skopeo 1.9 recompresses only into the dir: transport; push the result on, and time both steps
        pull_s, pull_rss = timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-compress",
                                  "--dest-compress-format", "zstd", "--format", "oci",
                                  f"docker://{base}:gzip", f"dir:{work / 'zstd-dir'}"])
        push_s, push_rss = timed(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"dir:{work / 'zstd-dir'}",
                                  f"docker://{base}:skopeo-zstd"])
        baseline_s, baseline_rss = pull_s + push_s, max(pull_rss, push_rss)
        source, seekable, zstd = (image_bytes(peerpull, f"{base}:{t}") for t in ("gzip", "seekable", "skopeo-zstd"))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)])

    if not all("zstd" in layer["media_type"] for layer in zstd["layers"]):
        raise SystemExit("bench: skopeo did not recompress to zstd; the baseline would be meaningless")
    figures = {
        "uncompressed_bytes": uncompressed,
        "source_bytes": source["total_size"],
        "converted_bytes": seekable["total_size"],
        "baseline_bytes": zstd["total_size"],
        "convert_seconds": round(convert_s, 2),
        "baseline_seconds": round(baseline_s, 2),
        "convert_mb_per_s": round(uncompressed / 1e6 / convert_s, 1),
        "baseline_mb_per_s": round(uncompressed / 1e6 / baseline_s, 1),
        "peak_rss_mb": round(convert_rss, 1),
        "baseline_peak_rss_mb": round(baseline_rss, 1),
        "toc_bytes": sum(layer["toc_bytes"] or 0 for layer in seekable["layers"]),
        "chunks": sum(layer["chunks"] or 0 for layer in seekable["layers"]),
        "files": sum(layer["files"] or 0 for layer in seekable["layers"]),
        "chunk_size": args.chunk_size,
    }
    rows = [
        ("input (uncompressed layers)", f"{uncompressed / 1e6:,.0f} MB", ""),
        ("time", f"{convert_s:.1f} s", f"{baseline_s:.1f} s"),
        ("throughput (uncompressed MB/s)", f"{figures['convert_mb_per_s']:.0f}", f"{figures['baseline_mb_per_s']:.0f}"),
        ("  ratio vs skopeo zstd", f"{baseline_s / convert_s:.2f}×", "1.00×"),
        ("  ratio vs eStargz reference (8 MB/s)", f"{figures['convert_mb_per_s'] / ESTARGZ_REFERENCE_MB_S:.1f}×",
         f"{figures['baseline_mb_per_s'] / ESTARGZ_REFERENCE_MB_S:.1f}×"),
        ("peak RSS", f"{convert_rss:.0f} MB", f"{baseline_rss:.0f} MB"),
        ("image size (gzip source: {:,.0f} MB)".format(figures["source_bytes"] / 1e6),
         f"{figures['converted_bytes'] / 1e6:,.0f} MB", f"{figures['baseline_bytes'] / 1e6:,.0f} MB"),
        ("  size vs gzip source", f"{figures['converted_bytes'] / figures['source_bytes']:.3f}×",
         f"{figures['baseline_bytes'] / figures['source_bytes']:.3f}×"),
        ("TOC bytes / chunks / files", f"{figures['toc_bytes']:,} / {figures['chunks']:,} / {figures['files']:,}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'peerpull convert':>22}  {'skopeo → zstd':>16}")
    for name, ours, theirs in rows:
        print(f"{name:{width}}  {ours:>22}  {theirs:>16}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
