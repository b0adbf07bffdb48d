"""Reads of a fully cached large file through the FUSE mount vs the same file on disk, in one run.

A server process holds one layer with one large file (1 MiB zstd chunks, about 2:1 compressible),
fetches every chunk into a real chunk cache, materialises the file into the object store and
mounts it twice over the kernel transport: once with FUSE passthrough (what a complete file gets)
and once served by Python from the cache (what every read cost before passthrough). This process
reads each of the three (the store's file directly from disk, passthrough, Python) sequentially in 1 MiB reads and with 4 KiB
reads at random offsets, dropping the page cache before every measurement; the server's CPU per
READ request is taken over the Python-served reads. Rounds rotate the order of the three; medians.

    bench/fuse_reads.py [--mib 512] [--random 20000] [--rounds 5] [--json FILE]
    bench/fuse_reads.py --open-completion 118 [--mib 256]   # stream a cold file vs complete it at open
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converter.format import toc as fmt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYER = "sha256:" + "f5" * 32
LAYER_DIR = LAYER.split(":", 1)[1]
MIB = 1 << 20
BLOCK = 4096
MODES = ("disk", "passthrough", "python")


def content(size: int) -> bytes:
    """Deterministic bytes that compress about 2:1 (half of every 4 KiB random, half zeros)."""
    rnd = random.Random(5)
    half = b"\0" * (BLOCK // 2)
    return b"".join(rnd.randbytes(BLOCK // 2) + half for _ in range(size // BLOCK))


# ---- the server ------------------------------------------------------------------------------

def one_file_layer(size: int) -> tuple[fmt.Toc, dict[str, bytes]]:
    """A layer of one file `data` of `size` bytes in 1 MiB chunks: its TOC and its frames by digest."""
    import zstandard

    from converter.format import toc as fmt

    data = content(size)
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
    frames: dict[str, bytes] = {}
    chunks, offset = [], 0
    for at in range(0, size, MIB):
        piece = data[at:at + MIB]
        frame = cctx.compress(piece)
        chunk = fmt.Chunk(at, len(piece), offset, len(frame), hashlib.sha256(piece).digest())
        frames[chunk.digest_hex] = frame
        chunks.append(chunk)
        offset += len(frame)
    toc = fmt.Toc(MIB, [fmt.TocEntry(path=".", type=fmt.DIR, mode=0o755),
                        fmt.TocEntry(path="data", type=fmt.FILE, mode=0o644, size=size, chunks=chunks)])
    return toc, frames


def serve(work: Path, size: int) -> None:

    from peer.cache import ChunkCache
    from peer.chunk import ChunkRef
    from peer.fetcher import ChunkFetcher
    from peer.metrics import PeerMetrics
    from peerpull.config import LogConfig
    from peerpull.logs import configure_logging
    from snapshotter.fs.file_reader import FileReader
    from snapshotter.fs.fusefs import LayerFS
    from snapshotter.fs.mount import KernelMount
    from snapshotter.fs.objects import ObjectStore
    from snapshotter.fs.passthrough import Passthrough

    configure_logging(LogConfig(level="warning", format="json"))  # on stderr: stdout is the protocol

    class LocalOrigin:
        """The origin tier from memory: only the cache matters here (every chunk is cached first)."""

        def __init__(self, frames: dict[str, bytes]) -> None:
            self.frames = frames

        async def fetch_frame(self, ref: ChunkRef, background: bool = False) -> bytes:
            return self.frames[ref.digest]

    toc, frames = one_file_layer(size)

    async def run() -> None:
        cache = ChunkCache(str(work / "cache"), 4 * size + (1 << 30))
        fetcher = ChunkFetcher(cache, LocalOrigin(frames), PeerMetrics())
        store = ObjectStore(work / "objects", 2 * size + (64 << 20))
        passthrough = Passthrough(store, cache.known, fetcher, MIB)
        mounts, sessions = {}, {}
        for mode in ("passthrough", "python"):
            fs = LayerFS(FileReader(fetcher, 64 << 20, "sequential", 8),
                         passthrough=passthrough if mode == "passthrough" else None)
            layer = fs.add_layer(LAYER, 1, "bench/fuse-reads", toc)
            point = work / f"mnt-{mode}"
            point.mkdir()
            mounts[mode] = KernelMount(fs, point, 512, 1024)
            mounts[mode].open()
        # every chunk into the disk cache (verified), then the file into the store
        for c in toc.entries[1].chunks:
            await fetcher.get(layer.source.ref(c))
        await fetcher.flush()
        frames.clear()  # from here on every byte comes from the cache or the store
        node = layer.tree.root.children[b"data"]  # type: ignore[index]
        backing = await passthrough.materialise(layer.source, node.ino, size, node.chunks)
        tasks = [asyncio.ensure_future(m.serve()) for m in mounts.values()]
        for mode, m in mounts.items():
            assert m.session is not None
            sessions[mode] = m.session
        if not sessions["passthrough"].passthrough:
            raise SystemExit("this kernel does not offer FUSE passthrough (6.9+)")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_signal_handler(signal.SIGTERM, finish)

        def command() -> None:
            line = sys.stdin.readline()
            if not line:
                finish()
                return
            print(json.dumps({mode: s.reads for mode, s in sessions.items()}), flush=True)

        loop.add_reader(sys.stdin.fileno(), command)
        print(json.dumps({"ready": True, "backing": str(backing),
                          "paths": {mode: str(m.mountpoint / LAYER_DIR / "data") for mode, m in mounts.items()}}),
              flush=True)
        try:
            await done
        finally:
            loop.remove_reader(sys.stdin.fileno())
            for m, t in zip(mounts.values(), tasks):
                await m.stop(t)
                m.close()
            await passthrough.close()
            await fetcher.cancel_fetches()
            fetcher.close()
            cache.close()

    asyncio.run(run())


# ---- completing a file at open: does it pay? ------------------------------------------------

def open_completion(work: Path, mib: int, link_bytes_per_s: float) -> dict[str, float]:
    """A cold large file read sequentially once: streamed through FUSE as it arrives (what peerpull
    does) vs fetched whole and materialised at open, then read in passthrough (what stargz does at
    open). The origin is a link of `link_bytes_per_s` (one frame at a time, the rate enforced)."""
    return asyncio.run(_open_completion(work, mib * MIB, link_bytes_per_s))


async def _open_completion(work: Path, size: int, rate: float) -> dict[str, float]:

    from peerpull.config import LogConfig
    from peerpull.logs import configure_logging

    configure_logging(LogConfig(level="warning", format="json"))

    from peer.cache import ChunkCache
    from peer.chunk import ChunkRef
    from peer.fetcher import ChunkFetcher
    from peer.metrics import PeerMetrics
    from snapshotter.fs.file_reader import FileReader
    from snapshotter.fs.fusefs import LayerFS
    from snapshotter.fs.mount import KernelMount
    from snapshotter.fs.objects import ObjectStore
    from snapshotter.fs.passthrough import Passthrough

    toc, frames = one_file_layer(size)

    class Link:
        """The origin behind a link of `rate` bytes/s: frames go over it one after another."""

        def __init__(self) -> None:
            self.lock = asyncio.Lock()

        async def fetch_frame(self, ref: ChunkRef, background: bool = False) -> bytes:
            async with self.lock:
                frame = frames[ref.digest]
                await asyncio.sleep(len(frame) / rate)
                return frame

    def read_timed(path: Path) -> tuple[float, float]:
        started = time.monotonic()
        first = 0.0
        with open(path, "rb", buffering=0) as f:
            while f.read(MIB):
                first = first or time.monotonic() - started
        return first, time.monotonic() - started

    out: dict[str, float] = {}
    for way in ("stream", "complete_at_open"):
        root = work / way
        root.mkdir(parents=True)
        cache = ChunkCache(str(root / "cache"), 4 * size + (1 << 30))
        fetcher = ChunkFetcher(cache, Link(), PeerMetrics())
        passthrough = Passthrough(ObjectStore(root / "objects", 2 * size + (64 << 20)), cache.known, fetcher, MIB)
        fs = LayerFS(FileReader(fetcher, 64 << 20, "sequential", 8), passthrough=passthrough)
        layer = fs.add_layer(LAYER, 1, "bench/fuse-reads", toc)
        node = layer.tree.root.children[b"data"]  # type: ignore[index]
        point = root / "mnt"
        point.mkdir()
        mount = KernelMount(fs, point, 512, 1024)
        mount.open()
        serving = asyncio.ensure_future(mount.serve())
        path = point / LAYER_DIR / "data"
        try:
            await asyncio.to_thread(os.stat, path)
            started = time.monotonic()
            if way == "complete_at_open":  # what an OPEN would wait for before its answer
                await passthrough.materialise(layer.source, node.ino, size, node.chunks)
            waited = time.monotonic() - started
            first, total = await asyncio.to_thread(read_timed, path)
            out[f"{way}_first_mib_s"] = round(waited + first, 2)
            out[f"{way}_whole_file_s"] = round(waited + total, 2)
        finally:
            await mount.stop(serving)
            mount.close()
            await passthrough.close()
            await fetcher.cancel_fetches()
            fetcher.close()
            cache.close()
    out["link_mb_s"] = round(rate / 1e6, 1)
    out["file_bytes"] = size
    return out


# ---- the reader ------------------------------------------------------------------------------

def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sequential_mb_s(path: str) -> float:
    drop_caches()
    started, total = time.monotonic(), 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(MIB):
            total += len(block)
    return total / (time.monotonic() - started) / 1e6


def random_iops(path: str, reads: int, size: int, seed: int) -> float:
    drop_caches()
    rnd = random.Random(seed)
    offsets = [rnd.randrange(size // BLOCK) * BLOCK for _ in range(reads)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # the page cache reads what is asked, not ahead
        started = time.monotonic()
        for off in offsets:
            os.pread(fd, BLOCK, off)
        return reads / (time.monotonic() - started)
    finally:
        os.close(fd)


class Server:
    def __init__(self, work: Path, size: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(work), str(size)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the FUSE server did not start (root, /dev/fuse and kernel 6.9+ needed)")
        self.info = json.loads(line)

    def reads(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        counts: dict[str, int] = json.loads(self.proc.stdout.readline())
        return counts

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def measure(work: Path, mib: int, random_reads: int, rounds: int) -> dict[str, Any]:
    """Every figure of one run (medians over `rounds`), keys as bench/coldstart --json writes them."""
    size = mib * MIB
    work.mkdir(parents=True, exist_ok=True)
    server = Server(work, size)
    try:
        paths = dict(server.info["paths"])
        # the disk figure reads the very file passthrough reads (the store's copy): the same blocks,
        # so where the file landed on the disk (or in the host's cache) cancels out of the ratio
        paths["disk"] = server.info["backing"]
        seq: dict[str, list[float]] = {m: [] for m in MODES}
        rnd: dict[str, list[float]] = {m: [] for m in MODES}
        cpu_per_read: list[float] = []
        passthrough_reads = 0
        for r in range(rounds):
            for mode in MODES[r % 3:] + MODES[:r % 3]:  # each path first once: no order bias
                before, cpu0 = server.reads(), cpu_seconds(server.proc.pid)
                seq[mode].append(sequential_mb_s(paths[mode]))
                # Python-served random reads are slow: fewer of them give the rate as well
                count = random_reads // 5 if mode == "python" else random_reads
                rnd[mode].append(random_iops(paths[mode], count, size, seed=r))
                after, cpu1 = server.reads(), cpu_seconds(server.proc.pid)
                if mode == "python" and after["python"] > before["python"]:
                    cpu_per_read.append(1e6 * (cpu1 - cpu0) / (after["python"] - before["python"]))
                passthrough_reads += after["passthrough"] - before["passthrough"]
                print(f"round {r + 1}: {mode:11} sequential {seq[mode][-1]:7.0f} MB/s   "
                      f"4 KiB random {rnd[mode][-1]:8.0f} reads/s", flush=True)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    med = {m: (statistics.median(seq[m]), statistics.median(rnd[m])) for m in MODES}

    def ratio(rates: dict[str, list[float]], mode: str) -> float:
        # paired per round (the two reads ran minutes apart at most): the machine's load cancels better
        return round(statistics.median(a / b for a, b in zip(rates[mode], rates["disk"])), 2)

    return {
        "fuse_seq_mb_s": round(med["passthrough"][0], 1), "disk_seq_mb_s": round(med["disk"][0], 1),
        "fuse_random_iops": round(med["passthrough"][1]), "disk_random_iops": round(med["disk"][1]),
        "python_seq_mb_s": round(med["python"][0], 1), "python_random_iops": round(med["python"][1]),
        "fuse_seq_ratio": ratio(seq, "passthrough"), "fuse_random_ratio": ratio(rnd, "passthrough"),
        "python_seq_ratio": ratio(seq, "python"), "python_random_ratio": ratio(rnd, "python"),
        "python_cpu_us_per_read": round(statistics.median(cpu_per_read), 1) if cpu_per_read else None,
        "passthrough_read_requests": passthrough_reads, "fuse_reads_file_bytes": size, "fuse_reads_rounds": rounds,
        "fuse_reads_ranges": {f"{m}_{k}": [round(min(v[m]), 1), round(max(v[m]), 1)]
                              for m in MODES for k, v in (("seq_mb_s", seq), ("random_iops", rnd))},
    }


def table(f: dict[str, Any]) -> str:
    ranges = f["fuse_reads_ranges"]

    def span(mode: str, key: str) -> str:
        low, high = ranges[f"{mode}_{key}"]
        return f"{low:.0f}–{high:.0f}"

    rows = [("disk (the store's ext4 file itself)", "disk", f["disk_seq_mb_s"], f["disk_random_iops"], 1.0, 1.0),
            ("FUSE, passthrough", "passthrough", f["fuse_seq_mb_s"], f["fuse_random_iops"], f["fuse_seq_ratio"],
             f["fuse_random_ratio"]),
            ("FUSE, served by Python", "python", f["python_seq_mb_s"], f["python_random_iops"], f["python_seq_ratio"],
             f["python_random_ratio"])]
    lines = [f"file: {f['fuse_reads_file_bytes'] >> 20} MiB, fully cached, page cache dropped before each; "
             f"medians of {f['fuse_reads_rounds']} (range); ratios: median of each round's ratio", "",
             "| read path | sequential MB/s | 4 KiB random reads/s | sequential vs disk | random vs disk |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {s:.0f} ({span(m, 'seq_mb_s')}) | {r:.0f} ({span(m, 'random_iops')}) | {sr:.2f}× | {rr:.2f}× |"
              for name, m, s, r, sr, rr in rows]
    lines += ["", f"* READ requests reaching the daemon from passthrough reads: {f['passthrough_read_requests']}",
              f"* daemon CPU per Python-served READ (sequential and random): {f['python_cpu_us_per_read']} µs"]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the file (default 512)")
    parser.add_argument("--random", type=int, default=20000, help="4 KiB random reads per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every read path; medians (default 5)")
    parser.add_argument("--open-completion", metavar="MB_S", type=float,
                        help="instead: a cold file streamed through FUSE vs completed at open, over a link of MB_S")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("fuse_reads needs root (FUSE mounts, dropping the page cache)")
    work = Path(tempfile.mkdtemp(prefix="peerpull-fusereads-", dir="/var/tmp"))
    if args.open_completion:
        try:
            result = open_completion(work, args.mib, args.open_completion * 1e6)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(result))
        return
    figures = measure(work, args.mib, args.random, args.rounds)
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
