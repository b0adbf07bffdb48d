"""Real nodes (own network namespace, containerd and `peerpull daemon`, shaped links on a bridge;
bench/cluster's own code) start the same container at the same instant, or warm the image at
once: the registry sends what one node needs about once, every node's output is right, and a
split warm-up leaves every chunk, verified, on every node. Egress and correctness, never time."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import sys
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import msgpack
import pytest

from converter.format.layer_reader import decompress_chunk
from converter.registry.client import RegistryClient
from peer.chunk import ChunkRef
from peer.ring import owners
from peer.warm import image_chunks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import cluster_bench  # noqa: E402
from cluster_net import ClusterNet  # noqa: E402

NODES = 3
RATE = "400mbit"


def _missing() -> str | None:
    for tool in ("ip", "tc", "nsenter", "containerd", "ctr", "runc", "skopeo"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None if Path("/dev/fuse").exists() else "no /dev/fuse"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    if reason := _missing():
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("cluster")
    with ExitStack() as stack:
        net = stack.enter_context(ClusterNet(NODES, RATE, RATE))
        yield cluster_bench.prepare(stack, net, work, "small", 8, work / "cache", chunk_size=64 << 10)


def test_the_network_is_shaped_both_ways_on_every_link(setup) -> None:
    # a node link and the registry's: tbf on the namespace side and on the bridge side
    assert len(setup.net.shaping) == 2 * (NODES + 1)
    assert all(" tbf " in line and "rate 400Mbit" in line for line in setup.net.shaping), setup.net.shaping


def test_three_nodes_start_one_container_at_once_and_the_registry_sends_it_about_once(setup, tmp_path) -> None:
    from sim.feed_files import from_saved

    alone = cluster_bench.cold_start(setup, 1, None, tmp_path / "feed")
    assert alone["outputs_ok"], alone["per_node"]
    # --save-feed: the image's TOC as the simulation reads it (this container reads the whole image,
    # so its profile is dropped: the feed is every frame); its working set is what the node needed
    saved = from_saved(tmp_path / "feed")
    assert {r.digest for r in saved.refs} == {r.digest for r in _refs(setup)}
    assert 0.9 * alone["single_node_bytes"] <= saved.bytes <= alone["single_node_bytes"]
    # one node alone needs the data it reads: most of the 8 MiB the container hashes
    assert alone["single_node_bytes"] > 6 << 20
    record = cluster_bench.cold_start(setup, NODES, alone["single_node_bytes"])
    assert set(cluster_bench.JSON_KEYS) <= set(record)
    assert record["nodes"] == NODES and len(record["per_node"]) == NODES
    for node in record["per_node"]:
        assert node["exit_code"] == 0 and node["output"].splitlines()[-1] == setup.expected_output, node
        assert node["ready_s"] is not None
    assert record["egress_ratio"] <= 1.5, record
    # the rest came from the other nodes, over their links: peers served and uploaded it
    assert sum(n["from_peers_bytes"] for n in record["per_node"]) > alone["single_node_bytes"]
    assert sum(n["served_bytes"] for n in record["per_node"]) > alone["single_node_bytes"]
    assert max(n["link_tx_bytes"] for n in record["per_node"]) >= record["max_served_bytes"]


def _refs(setup) -> list[ChunkRef]:
    async def go() -> list[ChunkRef]:
        async with RegistryClient(setup.registry_config) as client:
            return (await image_chunks(client, setup.image))[0]
    return asyncio.run(go())


def _cached_frames(node_address: str, refs: list[ChunkRef]) -> dict[int, tuple[str, bytes]]:
    body = msgpack.packb([ref.pack() for ref in refs], use_bin_type=True)
    req = urllib.request.Request(f"http://{node_address}/v1/chunks", data=body,
                                 headers={"Authorization": f"Bearer {cluster_bench.TOKEN}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        raw = resp.read()
    return {i: (tier, frame) for i, tier, frame in msgpack.Unpacker(io.BytesIO(raw), raw=False) if i != -1}


def test_a_split_warm_up_fetches_each_share_once_and_leaves_every_chunk_on_every_node(setup) -> None:
    refs = _refs(setup)
    assert len(refs) > 60
    members = [f"p4-node{i}" for i in range(NODES)]
    with cluster_bench.Cluster(setup.net, NODES, setup.work / "warm-test", setup.node_env()) as cluster:
        egress0 = setup.egress()
        nodes = [a for n in cluster.nodes for a in ("--node", n.address)]
        result = cluster_bench.peerpull_cli("warm", setup.image, *nodes, registry=setup.registry.address,
                                            env={"PEERPULL_PEER_TOKEN": cluster_bench.TOKEN})
        egress = setup.egress() - egress0
        reports = json.loads(result.stdout)["nodes"]
        assert egress <= 1.2 * setup.image_bytes, (egress, setup.image_bytes)
        for i, node in enumerate(cluster.nodes):
            report = reports[node.address]
            share = [r for r in refs if owners(r.digest, members)[0] == f"p4-node{i}"]
            # its ring share from the registry, everything else from the owners (none timed out)
            assert report["ring_members"] == NODES and report["share"] == len(share), report
            assert report["fallbacks"] == 0 and report["tiers"] == {"origin": len(share), "peer": len(refs) - len(share)}
            # no peer asked it for a chunk it did not hold yet: it never fetched for others
            metrics = node.metrics()
            assert metrics.get('peerpull_served_chunks_total{source="origin"}', 0.0) == 0
            assert metrics.get('peerpull_served_chunks_total{source="cache"}', 0.0) > 0
            for start in range(0, len(refs), 128):
                batch = refs[start:start + 128]
                items = _cached_frames(node.address, batch)
                assert len(items) == len(batch)
                for index, ref in enumerate(batch):
                    tier, frame = items[index]
                    assert tier == "cache"
                    decompress_chunk(frame, ref.as_chunk())  # raises unless the sha256 matches
