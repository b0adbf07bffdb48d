"""`peerpull status` against a running daemon after a lazy pull, the daemon down, --watch; the
locality line of `peerpull pull`; the ring of recent events."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog

from peer.status import EventRing
from peerpull.testbed.registry import free_port
from tests.support import images
from tests.support.cli import final_error, peerpull_cmd
from tests.support.containerd import NAMESPACE, run_container
from tests.support.lazy_stack import LazyStack
from tests.support.peer_cluster import TOKEN, start_cluster

pytestmark = [pytest.mark.root]

FILES = {f"data/file{i}.bin": random.Random(60 + i).randbytes(300 * 1024) for i in range(4)}


@pytest.fixture(scope="module")
def pulled(lazy_stack: LazyStack) -> dict[str, str]:
    """A seekable image pulled lazily with `peerpull pull` (text output), one file of it read."""
    layout = lazy_stack.root / "p6-status"
    images.build_simple_image(layout, FILES)
    source = images.push_layout(layout, lazy_stack.registry.address, "p6status/original")
    target = f"{lazy_stack.registry.address}/p6status/seekable:1"
    lazy_stack.convert(source, target, images.CHUNK)
    env = {**os.environ, "PEERPULL_PEER_LISTEN_PORT": str(lazy_stack.daemon.port),
           "PEERPULL_PEER_LISTEN_HOST": "127.0.0.1"}
    result = subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "pull", target,
                             "--address", str(lazy_stack.containerd.socket), "--namespace", NAMESPACE],
                            capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_container(lazy_stack.containerd, target, ["/bin/busybox", "sha256sum", "/data/file1.bin"],
                        snapshotter="peerpull")
    assert out.split()[0] == hashlib.sha256(FILES["data/file1.bin"]).hexdigest()
    return {"target": target, "pull_stdout": result.stdout}


def _status(stack: LazyStack, *extra: str) -> subprocess.CompletedProcess[str]:
    return peerpull_cmd("--log-level", "warning", "status", "--node", stack.daemon.peer_address, *extra)


def test_pull_ends_with_the_images_locality_line(pulled: dict[str, str]) -> None:
    last = pulled["pull_stdout"].strip().splitlines()[-1]
    assert last.startswith(f"{pulled['target']}: ") and "% local (" in last and "lazy layers" in last, last


def test_status_json_shows_the_image_tiers_and_members(lazy_stack: LazyStack, pulled: dict[str, str]) -> None:
    result = _status(lazy_stack, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    image = next(i for i in status["images"] if i["image"] == pulled["target"])
    assert image["layers"] >= 2 and image["chunks"] > 0 and image["bytes"] > 0
    # the file the container read came through the cache: part of the image is local, not all of it
    assert 0 < image["bytes_local"] <= image["bytes"] and 0 < image["local_ratio"] <= 1
    assert image["manifest"].startswith("sha256:")
    assert set(status["tiers"]) == {"cache", "peer", "origin"} and status["tiers"]["origin"] > 0
    assert status["members"][0]["self"] is True and status["members"][0]["node_id"] == f"node-{lazy_stack.daemon.port}"
    assert status["cache"]["bytes"] > 0 and status["cache"]["limit_bytes"] > status["cache"]["bytes"]
    assert 0 <= status["hit_ratio"] <= 1 and status["fuse_reads"] > 0
    assert isinstance(status["events"], list)


def test_status_text_is_for_a_person(lazy_stack: LazyStack, pulled: dict[str, str]) -> None:
    result = _status(lazy_stack)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"node    node-{lazy_stack.daemon.port} at {lazy_stack.daemon.peer_address}" in text
    assert "hit ratio" in text and "origin " in text and "members 1, 1 healthy" in text
    assert any(line.strip().startswith(f"{pulled['target']}: ") and "% local" in line for line in text.splitlines())


def test_status_watch_refreshes(lazy_stack: LazyStack, pulled: dict[str, str]) -> None:
    # read pages as they come rather than for a fixed time: a loaded machine may take seconds to start Python
    proc = subprocess.Popen([sys.executable, "-m", "peerpull", "--log-level", "warning", "status", "--node",
                             lazy_stack.daemon.peer_address, "--watch", "0.2"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out, pages = [], 0
    killer = threading.Timer(120, proc.kill)  # readline would block for ever on a silent hang
    killer.start()
    try:
        while pages < 2:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            pages += line.startswith("node    node-")
    finally:
        killer.cancel()
        proc.kill()
        proc.wait()
    assert pages >= 2, "".join(out)


def test_status_with_the_daemon_down_is_one_line_and_exit_5() -> None:
    node = f"127.0.0.1:{free_port('127.0.0.1')}"
    result = peerpull_cmd("status", "--node", node)
    error = final_error(result.stderr)
    assert result.returncode == 5 and error.lines == 1
    assert f"cannot reach node {node}" in error.message and "peerpull daemon" in error.message


def test_the_event_ring_keeps_recent_warnings_and_errors_only() -> None:
    log = structlog.get_logger("tests.p6")
    with EventRing(size=3) as ring:
        logging.getLogger().setLevel(logging.INFO)
        log.info("not_kept")
        for i in range(5):
            log.warning("lazy_layer_fallback", layer=f"sha256:{i}", error="boom")
    log.warning("after_removal")
    assert [e["event"] for e in ring.events] == ["lazy_layer_fallback"] * 3
    assert [e["layer"] for e in ring.events] == ["sha256:2", "sha256:3", "sha256:4"]
    assert ring.events[-1]["level"] == "warning" and ring.events[-1]["error"] == "boom"


def test_progress_is_log_events_off_a_terminal_and_a_bar_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from peerpull.progress import Progress
    # off a terminal (a fresh process, logging as the CLI sets it up): one JSON event per update, nothing else
    code = ("from peerpull.config import LogConfig\nfrom peerpull.logs import configure_logging\n"
            "configure_logging(LogConfig(format='auto'))\nfrom peerpull.progress import Progress\n"
            "with Progress('warm_progress', 'warming img', image='img') as p:\n"
            "    p.update(completed=2, total=5, text='fetching')\n    print(p.on_terminal)\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == "False", child.stderr
    [line] = child.stderr.strip().splitlines()
    event = json.loads(line)
    assert {k: event[k] for k in ("event", "image", "completed", "total", "text")} == {
        "event": "warm_progress", "image": "img", "completed": 2, "total": 5, "text": "fetching"}
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stderr", screen)
    with Progress("warm_progress", "warming img", tty=True) as bar:
        bar.update(completed=5, total=5, text="fetching")
    assert bar.on_terminal
    assert "warming img" in screen.getvalue() and "5/5" in screen.getvalue()


def test_status_of_a_peer_node_shows_members_health_and_needs_the_token(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path / "p6-cluster", 2)
    try:
        env = {**os.environ, "PEERPULL_PEER_TOKEN": TOKEN}
        refused = peerpull_cmd("status", "--node", nodes[0].address, env={k: v for k, v in env.items()
                                                                          if k != "PEERPULL_PEER_TOKEN"})
        assert refused.returncode == 6 and "cluster token" in final_error(refused.stderr).message
        status = json.loads(peerpull_cmd("status", "--node", nodes[0].address, "--json", env=env).stdout)
        assert [(m["node_id"], m["healthy"]) for m in status["members"]] == [("node0", True), ("node1", True)]
        assert status["images"] == []  # a peer node alone serves no images
        nodes[1].stop()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = json.loads(peerpull_cmd("status", "--node", nodes[0].address, "--json", env=env).stdout)
            if not status["members"][1]["healthy"]:
                break
            time.sleep(0.3)
        # gone from the ring after three missed rounds, still listed by its address
        assert status["members"][1]["address"] == nodes[1].address and status["members"][1]["healthy"] is False
        text = peerpull_cmd("status", "--node", nodes[0].address, env=env).stdout
        assert "members 2, 1 healthy" in text and f"DOWN  {nodes[1].address}" in text, text
    finally:
        for node in nodes:
            node.stop()
