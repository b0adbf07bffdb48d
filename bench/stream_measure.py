"""Measure streaming (peer/stream.py) over a rate-limited link, without containerd: read every file
of a synthetic image through the FUSE reader's code path (FileReader), one file after another,
with and without background streaming, against downloading every blob whole (what an ordinary
pull moves). Needs root (a network namespace and tc). Usage:

    .venv/bin/python bench/stream_measure.py [--rate 1gbit] [--big-mib 150] [--small 3000]

Prints one line per mode: seconds, registry bytes, Range requests.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shaped_link import ShapedLink  # noqa: E402

from converter.format.layer_reader import location_from_annotations, read_toc  # noqa: E402
from converter.registry.blob_reader import RegistryBlobReader  # noqa: E402
from converter.registry.client import RegistryClient  # noqa: E402
from converter.registry.config import RegistryConfig  # noqa: E402
from converter.registry.manifest import parse_manifest  # noqa: E402
from converter.registry.reference import ImageReference  # noqa: E402
from peer.cache import ChunkCache  # noqa: E402
from peer.config import PeerConfig  # noqa: E402
from peer.fetcher import ChunkFetcher  # noqa: E402
from peer.metrics import PeerMetrics  # noqa: E402
from peer.origin import OriginSource  # noqa: E402
from peer.stream import Streamer  # noqa: E402
from peerpull.config import LogConfig  # noqa: E402
from peerpull.logs import configure_logging  # noqa: E402
from peerpull.testbed.oci_layout import LayerSpec, write_layout  # noqa: E402
from peerpull.testbed.registry import EmbeddedRegistry  # noqa: E402
from snapshotter.fs.file_reader import FileReader, LayerSource  # noqa: E402

# names of our own: other benchmarks on this machine use theirs
NS, HOST_IF, NS_IF = "ppd-stream", "ppds0", "ppds1"
NS_ADDR, HOST_ADDR = "10.79.0.1", "10.79.0.254"




def build(layout: Path, big_mib: int, small: int) -> None:
    rnd = random.Random(5)
    weights = LayerSpec()
    weights.add("model", type=tarfile.DIRTYPE)
    weights.add("model/weights.bin", rnd.randbytes(big_mib << 20))
    code = LayerSpec()
    code.add("lib", type=tarfile.DIRTYPE)
    for i in range(small):
        code.add(f"lib/m{i:05d}.py", rnd.randbytes(rnd.randint(1_000, 60_000)))
    write_layout(layout, [code.tar_bytes(), weights.tar_bytes()])


async def layers(client: RegistryClient, image: str) -> list[tuple[str, int, LayerSource, list]]:
    ref = ImageReference.parse(image)
    fetched, _ = await client.resolve_image(ref)
    manifest = parse_manifest(fetched.body, fetched.media_type, image)
    out = []
    for desc in manifest["layers"]:
        reader = RegistryBlobReader(client, ref, desc["digest"], desc["size"])
        _, toc = await read_toc(reader, location_from_annotations(desc.get("annotations")))
        source = LayerSource.from_toc(f"{ref.registry}/{ref.repository}", desc["digest"], toc)
        out.append((desc["digest"], desc["size"], source, [e for e in toc.entries if e.chunks]))
    return out


async def read_all(image: str, work: Path, prefetch: str, streamer_for_reads: bool, stream_all: bool,
                   read: bool = True) -> str:
    async with RegistryClient(RegistryConfig(insecure_hosts=(f"{NS_ADDR}:5000",))) as client:
        image_layers = await layers(client, image)
        config = PeerConfig()
        cache = ChunkCache(str(work), 8 << 30)
        cache.start_index()  # as PeerNode does
        origin = OriginSource(client, config)
        ranges: list[tuple[str, int, int]] = []
        read_pieces = client.read_range_pieces

        async def recorded(ref: ImageReference, blob: str, offset: int, length: int,
                           pieces: Sequence[tuple[int, int]]) -> list[bytes]:
            ranges.append((blob, offset, offset + length))
            return await read_pieces(ref, blob, offset, length, pieces)

        client.read_range_pieces = recorded  # type: ignore[method-assign]
        fetcher = ChunkFetcher(cache, origin, PeerMetrics())
        streamer = Streamer(fetcher, origin, cache, config)
        reader = FileReader(fetcher, 256 << 20, prefetch, config.prefetch_parallel, 4 << 20,
                            streamer if streamer_for_reads else None)
        started = time.monotonic()
        background = None
        if stream_all:
            refs = [s.ref(c) for _, _, s, _ in image_layers for c in s.chunks]
            background = asyncio.create_task(streamer.stream(refs, "all"))
        ino = 0
        for _, _, source, entries in image_layers:  # a reader that goes through every file, like `cat`
            for entry in entries if read else []:
                ino += 1
                for offset in range(0, entry.size, 1 << 20):
                    await reader.read(source, ino, entry.chunks, entry.size, offset, 1 << 20)
        if background is not None and not read:
            await background
        elapsed = time.monotonic() - started
        if background is not None:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
        await reader.close()
        await fetcher.cancel_fetches()
        await origin.close()
        fetcher.close()
        cache.close()
        return (f"{elapsed:7.2f} s  registry {origin.bytes / 1e6:8.1f} MB  range requests {origin.requests}"
                f"  bytes asked twice {twice(ranges) / 1e6:.1f} MB")


def twice(ranges: list[tuple[str, int, int]]) -> int:
    """Bytes covered by more than one of `ranges`."""
    out = 0
    by_blob: dict[str, list[tuple[int, int]]] = {}
    for blob, lo, hi in ranges:
        by_blob.setdefault(blob, []).append((lo, hi))
    for spans in by_blob.values():
        spans.sort()
        reach = -1
        for lo, hi in spans:
            if lo < reach:
                out += min(hi, reach) - lo
            reach = max(reach, hi)
    return out


async def whole_blobs(image: str) -> str:
    async with RegistryClient(RegistryConfig(insecure_hosts=(f"{NS_ADDR}:5000",))) as client:
        ref = ImageReference.parse(image)
        image_layers = await layers(client, image)
        started = time.monotonic()
        sizes = [size for _, size, _, _ in image_layers]
        # containerd downloads layers in parallel, each in one request (read here in 64 MiB ranges)
        async def one(blob: str, size: int) -> None:
            for offset in range(0, size, 64 << 20):
                await client.read_range(ref, blob, offset, min(64 << 20, size - offset))
        await asyncio.gather(*(one(blob, size) for blob, size, _, _ in image_layers))
        elapsed = time.monotonic() - started
        return f"{elapsed:7.2f} s  registry {sum(sizes) / 1e6:8.1f} MB  (download only, no unpack)"


def main() -> None:
    configure_logging(LogConfig(level="warning", format="console"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--big-mib", type=int, default=150)
    parser.add_argument("--small", type=int, default=3000)
    parser.add_argument("--only", type=int, help="run only this mode (0-4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ppd-stream-") as tmp, ShapedLink(args.rate, NS, HOST_IF, NS_IF, NS_ADDR, HOST_ADDR):
        work = Path(tmp)
        build(work / "layout", args.big_mib, args.small)
        with EmbeddedRegistry(work / "registry", host=NS_ADDR, port=5000, netns=NS):
            image = f"{NS_ADDR}:5000/measure/app:1"
            subprocess.run([sys.executable, "-m", "peerpull", "--insecure-registry", f"{NS_ADDR}:5000", "convert", "--quiet",
                            f"oci:{work / 'layout'}:latest", image], check=True)
            only = args.only
            modes = [
                ("ordinary pull (whole blobs)", None),
                ("on demand, prefetch=file (old default)", ("file", False, False)),
                ("on demand, prefetch=sequential + streamer", ("sequential", True, False)),
                ("stream the image in the background", ("sequential", True, True)),
                ("the stream alone, no reader", ("sequential", True, True, False)),
            ]
            for i, (name, mode) in enumerate(modes):
                if only is not None and i != only:
                    continue
                if mode is None:
                    line = asyncio.run(whole_blobs(image))
                else:
                    line = asyncio.run(read_all(image, work / f"cache{i}", *mode))
                print(f"{name:45s} {line}", flush=True)


if __name__ == "__main__":
    main()
