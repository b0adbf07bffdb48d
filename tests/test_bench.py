"""The benchmark's pure parts: the delaying relay, the plot, the JSON figures (no timings asserted
beyond the relay's lower bound, which is the delay it promises)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import coldstart_bench  # noqa: E402
from delay_relay import DelayRelay  # noqa: E402
from plot import plot_figures  # noqa: E402

# what issue 10 asks bench/coldstart --json to add to the keys it had
REQUIRED = ("rtt_ms", "pull_s", "image_chunks", "lazy_second_start_s", "normal_second_start_s", "read_all_lazy_s",
            "read_all_normal_s", "lazy_peer_registry_bytes", "working_set_bytes", "link_bytes_per_s")
EARLIER = ("normal_start_s", "normal_ready_s", "lazy_start_s", "lazy_ready_s", "lazy_peer_ready_s",
           "registry_bytes_before_start", "fuse_read_mb_per_s", "disk_read_mb_per_s")


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_relay_forwards_bytes_intact_and_adds_the_delay_each_way() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    delay = 0.05
    try:
        async with DelayRelay("127.0.0.1", 0, "127.0.0.1", port, delay) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            started = time.monotonic()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            assert time.monotonic() - started >= 2 * delay  # there and back
            payload = os.urandom(3 << 20)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()  # the relay passes the half-close on; the echo server then closes

            sender = asyncio.create_task(send())
            echoed = await reader.read()  # to EOF
            await sender
            assert echoed == payload
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


def _round(scale: float) -> dict[str, object]:
    return {"normal_pull_s": 14.0 * scale, "normal_start_s": 14.5 * scale, "normal_first_log_s": 15.8, "normal_ready_s": 17.8,
            "normal_second_start_s": 2.5, "normal_second_container_start_s": 0.6, "normal_second_pull_s": 0.2,
            "normal_second_first_log_s": 2.4, "normal_second_ready_s": 2.5, "normal_second_registry_bytes": 0,
            "normal_registry_bytes_before_start": 323_600_000, "normal_registry_bytes": 323_600_000,
            "lazy_pull_s": 0.7 * scale, "lazy_start_s": 1.2, "lazy_first_log_s": 7.6, "lazy_ready_s": 9.2 * scale,
            "lazy_second_start_s": 4.0, "lazy_second_container_start_s": 1.0, "lazy_second_pull_s": 0.4,
            "lazy_second_first_log_s": 3.9, "lazy_second_ready_s": 4.0, "lazy_second_registry_bytes": 0,
            "lazy_second_registry_requests": 0, "lazy_second_cpu_per_read_us": 80.0,
            "registry_bytes_before_start": 2_500_000, "lazy_registry_bytes": 151_600_000.0,
            "lazy_registry_log_bytes": 150_000_000, "lazy_daemon_cpu_s": 5.0, "lazy_fuse_reads": 20000.0,
            "lazy_cpu_per_read_us": 250.0, "lazy_peak_rss_mb": 400.0, "output": "2.13.0+cpu",
            "lazy_tier_samples": [{"t": 0.0, "cache": 0.0, "peer": 0.0, "origin": 0.0},
                                  {"t": 5.0, "cache": 1e6, "peer": 0.0, "origin": 8e7}],
            "lazy_peer_pull_s": 0.7, "lazy_peer_start_s": 1.3, "lazy_peer_first_log_s": 8.5, "lazy_peer_ready_s": 10.5,
            "lazy_peer_registry_bytes": 78_500_000.0, "lazy_peer_registry_log_bytes": 78_000_000,
            "lazy_peer_bytes_from_peers": 70_000_000.0, "read_all_normal_s": 16.9, "read_all_lazy_s": 56.7,
            "read_all_normal_registry_bytes": 323_600_000, "read_all_lazy_registry_bytes": 360_000_000,
            "read_all_lazy_peak_rss_mb": 600.0}


def _figures() -> dict[str, object]:
    return coldstart_bench.summarize([_round(1.0), _round(1.2), _round(0.9)], label="Debian + CPU torch 2.13.0",
                                     image_bytes=1_155_000_000, link="tbf rate 1gbit", rtt_ms=5.0, rtt_measured_ms=5.4,
                                     chunks=28_632, rate=118e6, fuse=(334.0, 849.0, "torch/lib/libtorch_cpu.so", 434_000_000))


def test_json_figures_keep_the_old_keys_and_add_the_issues() -> None:
    figures = _figures()
    assert set(coldstart_bench.JSON_KEYS) <= set(figures)
    for key in (*REQUIRED, *EARLIER):
        assert figures[key] is not None, key
    assert figures["lazy_ready_s"] == 9.2 and figures["ranges"]["lazy_ready_s"] == [9.2 * 0.9, 9.2 * 1.2]
    assert figures["pull_s"] == figures["lazy_pull_s"] == 0.7
    assert figures["working_set_transfer_s"] == round(150_000_000 / 118e6, 2)
    assert figures["physical_limit_s"] == 2.5  # the local-disk start is the larger of the two here
    table = coldstart_bench.table(figures)
    assert "| lazy, second start (same node) |" in table and "read every file, lazy" in table


def test_json_figures_of_a_run_that_skipped_rows_still_have_every_key() -> None:
    rounds = [{k: v for k, v in _round(1.0).items() if not k.startswith(("read_all", "lazy_peer", "normal_second",
                                                                         "lazy_second"))}]
    figures = coldstart_bench.summarize(rounds, label="x", image_bytes=1, link="tbf", rtt_ms=0.0, rtt_measured_ms=None,
                                        chunks=1, rate=1e8)
    assert set(coldstart_bench.JSON_KEYS) <= set(figures)
    assert figures["read_all_lazy_s"] is None and figures["physical_limit_s"] is None
    assert "read every file" not in coldstart_bench.table(figures)


def test_plot_writes_a_png_from_a_figures_dict(tmp_path: Path) -> None:
    out = plot_figures(_figures(), tmp_path / "timeline.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < len(data) < 200_000
