"""Several node processes against a real registry: the registry serves each chunk once per cluster."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from converter.format.layer_reader import decompress_chunk
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from peer.chunk import ChunkRef
from peer.warm import image_chunks
from tests.support.fault_proxy import FaultProxy
from tests.support.peer_cluster import build_cluster_image, start_cluster
from tests.test_convert import peerpull

CHUNK = 64 * 1024


@pytest.fixture
def seekable_image(registry, tmp_path: Path) -> str:
    build_cluster_image(tmp_path / "layout")
    target = f"{registry.address}/cluster/app:seekable"
    # format 1: a frame per small file, so the peers have hundreds of chunks to trade
    peerpull("convert", "--quiet", "--format-version", "1", "--chunk-size", str(CHUNK), f"oci:{tmp_path / 'layout'}:latest", target)
    return "cluster/app:seekable"


def chunk_refs(image: str) -> list[ChunkRef]:
    async def go() -> list[ChunkRef]:
        async with RegistryClient(RegistryConfig()) as client:
            return (await image_chunks(client, image))[0]
    return asyncio.run(go())


def origin_chunk_reads(proxy: FaultProxy, refs: list[ChunkRef]) -> Counter[str]:
    """How many times the registry sent each chunk's frame (TOC tail reads excluded)."""
    counts: Counter[str] = Counter()
    by_blob: dict[str, list[ChunkRef]] = {}
    for ref in refs:
        by_blob.setdefault(ref.blob, []).append(ref)
    for method, path, rng in proxy.requests:
        if method != "GET" or not rng or "/blobs/" not in path:
            continue
        blob = path.rsplit("/", 1)[-1]
        start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        chunks = by_blob.get(blob, [])
        if chunks and end >= max(r.blob_offset + r.compressed_length for r in chunks):
            continue  # a tail read for the footer and TOC
        for ref in chunks:
            if ref.blob_offset <= end and ref.blob_offset + ref.compressed_length - 1 >= start:
                counts[ref.digest] += 1
    return counts


def run_proxy(registry_url: str):
    loop = asyncio.new_event_loop()
    import threading
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxy = asyncio.run_coroutine_threadsafe(FaultProxy(registry_url).start(), loop).result(10)
    return proxy, loop, thread


def test_three_nodes_warm_at_once_and_the_registry_serves_each_chunk_once(registry, seekable_image, tmp_path) -> None:
    proxy, loop, thread = run_proxy(registry.url)
    nodes = start_cluster(tmp_path / "nodes", 3, extra_env={"PEERPULL_PEER_TRUSTED_REGISTRIES": proxy.address})
    try:
        image = f"{proxy.address}/{seekable_image}"
        refs = chunk_refs(image)
        proxy.requests.clear()
        with ThreadPoolExecutor(3) as pool:  # the traffic-spike case: every node cold at the same moment
            reports = list(pool.map(lambda n: n.warm(image), nodes))
        counts = origin_chunk_reads(proxy, refs)
        assert len(refs) > 250
        assert set(counts) == {r.digest for r in refs}
        assert max(counts.values()) == 1, [c for c in counts.values() if c > 1]
        for report in reports:
            assert report["chunks"] == len(refs)
        assert sum(r["tiers"].get("peer", 0) for r in reports) > len(refs)  # most chunks came from owners
        # every node now holds every chunk, verified, in its own cache
        for node in nodes:
            for start in range(0, len(refs), 128):
                batch = refs[start:start + 128]
                status, items = node.chunks(batch)
                assert status == 200 and len(items) == len(batch)
                for index, ref in enumerate(batch):
                    tier, frame = items[index]
                    assert tier == "cache"
                    decompress_chunk(frame, ref.as_chunk())
            assert node.metric("peerpull_chunk_requests_total", 'tier="origin"') < len(refs)
    finally:
        for node in nodes:
            node.stop()
        asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)


def test_peer_endpoints_need_the_cluster_token(registry, seekable_image, tmp_path) -> None:
    nodes = start_cluster(tmp_path / "nodes", 1, extra_env={"PEERPULL_PEER_TRUSTED_REGISTRIES": registry.address})
    try:
        ref = chunk_refs(f"{registry.address}/{seekable_image}")[0]
        status, _ = nodes[0].chunks([ref], token=None)
        assert status == 401
        status, _ = nodes[0].chunks([ref], token="wrong")
        assert status == 401
        status, _, _ = nodes[0].request("/v1/warm", b'{"image": "x/y:1"}', token=None)
        assert status == 401
        assert nodes[0].metric("peerpull_peer_requests_refused_total", 'reason="token"') == 3
        # probes have no token: health and metrics are open
        status, _, body = nodes[0].request("/v1/health", token=None)
        assert status == 200 and b'"protocol": "2"' in body
        status, items = nodes[0].chunks([ref])
        assert status == 200 and items[0][0] == "origin"
        assert len(decompress_chunk(items[0][1], ref.as_chunk())) == ref.length
        status, _, _ = nodes[0].request("/v1/chunks", b"\x93garbage")
        assert status == 400
    finally:
        nodes[0].stop()
