"""Real zeroconf discovery between hosts (network namespaces on a bridge): no static list."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.netns import BridgedHosts, netns_missing
from tests.support.peer_cluster import NodeProcess
from tests.support.waiting import wait_until


def test_nodes_find_each_other_by_mdns_and_a_stopped_node_leaves(tmp_path: Path) -> None:
    if reason := netns_missing():
        pytest.skip(reason)
    with BridgedHosts(3) as hosts:
        nodes = [NodeProcess(tmp_path, f"zc{i}", 7470, peers=[], host=hosts.address(i), discovery="zeroconf",
                             netns=hosts.names[i]).start() for i in range(3)]
        try:
            for node in nodes:
                node.wait_members(3, timeout_s=45)
            nodes[2].stop()
            wait_until(lambda: all(n.metric("peerpull_members") == 2 for n in nodes[:2]), 20, "zc2 to leave")
            assert [n.metric("peerpull_members") for n in nodes[:2]] == [2, 2]
            log = nodes[0].log_path.read_text()
            assert '"event": "peer_left"' in log and "zc2" in log
        finally:
            for node in nodes:
                node.stop()
