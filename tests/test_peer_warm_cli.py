"""`peerpull warm` against real nodes and hostile ones: it always ends, within its deadlines,
with the report or one error line and a documented exit code; its memory stays bounded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peerpull.testbed.registry import free_port
from tests.support.cli import assert_one_line_error, peerpull_cmd, peerpull_measured
from tests.support.hostile_server import HostileServer
from tests.support.peer_cluster import TOKEN, NodeProcess, build_cluster_image, start_cluster
from tests.test_convert import peerpull

RSS_LIMIT_MB = 300


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PEERPULL_")}, **extra}


@pytest.mark.parametrize("mode, args, code, needle", [
    ("silent", ["--idle-timeout", "2"], 1, "sent nothing for 2 s"),
    ("drip", ["--idle-timeout", "3", "--timeout", "4"], 1, "did not finish within 4 s"),
    ("drip_headers", ["--idle-timeout", "3", "--timeout", "4"], 1, "did not finish within 4 s"),
    ("garbage", [], 5, "lost node"),
    ("endless", [], 1, "malformed warm-up answer"),
    ("huge", [], 1, "malformed warm-up answer"),
])
def test_warm_against_a_hostile_node_ends_with_one_line(mode: str, args: list[str], code: int, needle: str) -> None:
    with HostileServer() as node:
        node.add("/v1/warm", mode, interval=0.5)
        result = peerpull_measured("warm", "reg.example:5000/a/b:1", "--node", node.address, *args,
                                   timeout=60, env=_env())
    assert result.returncode == code, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    record = json.loads(lines[-1])
    assert record["event"] == "command_failed" and needle in record["error"] and record["exit_code"] == code
    assert result.peak_rss_mb < RSS_LIMIT_MB


def test_warm_of_a_node_that_is_not_there_exits_5() -> None:
    result = peerpull_cmd("warm", "reg.example:5000/a/b:1", "--node", f"127.0.0.1:{free_port()}", env=_env())
    assert_one_line_error(result, 5, "cannot reach node")


def test_warm_streams_progress_and_prints_the_report(registry, tmp_path: Path) -> None:
    build_cluster_image(tmp_path / "layout", big_bytes=2 << 20, small_files=20)
    image = f"{registry.address}/warm/app:1"
    peerpull("convert", "--quiet", "--chunk-size", "65536", f"oci:{tmp_path / 'layout'}:latest", image)
    node = NodeProcess(tmp_path, "w", free_port(), [], discovery="none",
                       extra_env={"PEERPULL_PEER_WARM_PROGRESS_S": "0.05"}).start()
    try:
        node.wait_members(1)
        result = peerpull_cmd("warm", image, "--node", node.address, env=_env(PEERPULL_PEER_TOKEN=TOKEN))
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout)
        assert report["chunks"] > 20 and report["tiers"] == {"origin": report["chunks"]}
        wrong = peerpull_cmd("warm", image, "--node", node.address, env=_env(PEERPULL_PEER_TOKEN="wrong"))
        assert_one_line_error(wrong, 6, "cluster token")
        missing = peerpull_cmd("warm", f"{registry.address}/warm/none:1", "--node", node.address,
                               env=_env(PEERPULL_PEER_TOKEN=TOKEN))
        assert_one_line_error(missing, 7, "could not warm")
    finally:
        node.stop()


def test_a_split_warm_up_whose_owner_never_warms_falls_back_after_the_bounded_wait(registry, tmp_path: Path) -> None:
    """Two nodes, only one warmed: the other owns half the chunks but never fetches them, so after
    peer.warm_owner_wait_s with nothing new the warmed node takes them the ordinary way (the owner,
    which fetches them for it) and still ends with every chunk."""
    build_cluster_image(tmp_path / "layout", big_bytes=2 << 20, small_files=20)
    image = f"{registry.address}/warm/split:1"
    peerpull("convert", "--quiet", "--chunk-size", "65536", f"oci:{tmp_path / 'layout'}:latest", image)
    nodes = start_cluster(tmp_path / "nodes", 2, extra_env={"PEERPULL_PEER_TRUSTED_REGISTRIES": registry.address,
                                                            "PEERPULL_PEER_WARM_OWNER_WAIT_S": "1"})
    try:
        result = peerpull_cmd("warm", image, "--node", nodes[0].address, env=_env(PEERPULL_PEER_TOKEN=TOKEN))
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout)
        others = report["chunks"] - report["share"]
        assert report["ring_members"] == 2 and 0 < report["share"] < report["chunks"]
        assert report["fallbacks"] == others  # none of them ever appeared at the owner by itself
        assert report["tiers"] == {"origin": report["share"], "peer": others}
        # the owner fetched exactly those for the warmed node, from the registry
        assert nodes[1].metric("peerpull_served_chunks_total", 'source="origin"') == others
    finally:
        for node in nodes:
            node.stop()


def test_warm_of_several_nodes_ends_with_the_first_error_and_stops_the_others() -> None:
    # one node is not there, the other never answers: the missing one's error (exit 5) ends the
    # command at once, without waiting out the silent node's idle deadline
    with HostileServer() as silent:
        silent.add("/v1/warm", "silent")
        missing = f"127.0.0.1:{free_port()}"
        result = peerpull_measured("warm", "reg.example:5000/a/b:1", "--node", missing, "--node", silent.address,
                                   "--idle-timeout", "300", timeout=60, env=_env())
    assert_one_line_error(result, 5, f"cannot reach node {missing}")
