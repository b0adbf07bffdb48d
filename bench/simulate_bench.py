"""Simulated cold start of N nodes at the same instant, driven by the real peer code (bench/sim).

Every node streams the same working set: a real converted image's TOC and startup profile (by
default the realistic torch image's, saved at /var/cache/peerpull-bench/sim-feed; --feed DIR for
one `bench/cluster --save-feed DIR` wrote, --layout for an OCI layout, --image for a registry
reference, --profile for another profile; without a profile every frame, with a warning), or a
synthetic one with --working-set-mib, through peerpull's own membership, fan-out trees,
fetcher, source choice, peer-client batching, origin coalescing and streamer, on a virtual clock
over simulated links (each node's up/down bandwidth and latency, the registry's egress cap). Per N,
in the same run: origin egress ÷ working set, p50/p99 time to working set beside the time one node
takes alone on the same link, max and mean upload per node ÷ working set; the same with owner
churn (a share of nodes joining, as many leaving, during the start) and with slow or dead peers.

Examples:
  bench/simulate --nodes 10,100,1000
  bench/simulate --nodes 10,100 --fanout 0          # before: one owner per chunk, no tree
  bench/simulate --nodes 10,100,1000 --json sim.json --plot docs/simulate-2026-12-02.png
  bench/simulate --calibrate-only --calibrate-json cluster.json   # bench/cluster's N, links and image, simulated
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog  # noqa: E402
from sim import clock  # noqa: E402
from sim.cluster import Outcome, Scenario, Shape, run_scenario  # noqa: E402
from sim.feed import Feed, from_layout, synthetic  # noqa: E402
from sim.feed_files import DEFAULT_FEED, NO_PROFILE, from_registry, from_saved  # noqa: E402

from peer.config import PeerConfig  # noqa: E402

EXIT_USAGE = 2


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by nearest rank (values need not be sorted)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def simulate(feed: Feed, config: PeerConfig, shape: Shape, scenario: Scenario) -> tuple[Outcome, float]:
    started = time.monotonic()
    outcome = clock.run(run_scenario(feed, config, shape, scenario))
    return outcome, time.monotonic() - started


def record(n: int, feed: Feed, single_s: float, base: Outcome, churn: Outcome | None, faults: Outcome | None,
           walls: dict[str, float], churn_share: float = 0.0) -> dict[str, Any]:
    ws = feed.bytes
    rec: dict[str, Any] = {
        "nodes": n,
        "working_set_bytes": ws,
        "egress_ratio": round(base.egress_bytes / ws, 4),
        "p50_s": round(percentile(base.ready_s, 50), 3),
        "p99_s": round(percentile(base.ready_s, 99), 3),
        "single_node_s": round(single_s, 3),
        "max_upload_ratio": round(max(base.uploads, default=0) / ws, 3),
        "mean_upload_ratio": round(statistics.fmean(base.uploads) / ws if base.uploads else 0.0, 3),
        "complete": base.complete,
        "hedges": base.hedges,
        "wall_s": walls,
    }
    if churn is not None:
        rec.update(churn_egress_ratio=round(churn.egress_bytes / ws, 4), churn_p50_s=round(percentile(churn.ready_s, 50), 3),
                   churn_p99_s=round(percentile(churn.ready_s, 99), 3), churn_complete=churn.complete,
                   churn_unfinished=churn.unfinished, churn_events=2 * int(round(n * churn_share)))
    if faults is not None:
        rec.update(faults_egress_ratio=round(faults.egress_bytes / ws, 4), faults_p50_s=round(percentile(faults.ready_s, 50), 3),
                   faults_p99_s=round(percentile(faults.ready_s, 99), 3),
                   faults_max_upload_ratio=round(max(faults.uploads, default=0) / ws, 3),
                   faults_complete=faults.complete, faults_unfinished=faults.unfinished, faults_hedges=faults.hedges)
    return rec


def print_table(records: list[dict[str, Any]], title: str) -> None:
    print(f"\n{title}")
    head = (f"{'N':>6} {'egress/WS':>9} {'p50 s':>7} {'p99 s':>7} {'1 node s':>8} {'p99/1':>6} {'max up':>7} "
            f"{'mean up':>7} {'churn egr':>9} {'churn p99':>9} {'fault egr':>9} {'fault p99':>9} {'ok':>3}")
    print(head)
    for r in records:
        ok = r["complete"] and r.get("churn_complete", True) and r.get("faults_complete", True)
        print(f"{r['nodes']:>6} {r['egress_ratio']:>9.3f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} "
              f"{r['single_node_s']:>8.2f} {r['p99_s'] / r['single_node_s']:>6.2f} {r['max_upload_ratio']:>7.2f} "
              f"{r['mean_upload_ratio']:>7.2f} {r.get('churn_egress_ratio', float('nan')):>9.3f} "
              f"{r.get('churn_p99_s', float('nan')):>9.2f} {r.get('faults_egress_ratio', float('nan')):>9.3f} "
              f"{r.get('faults_p99_s', float('nan')):>9.2f} {'yes' if ok else 'NO':>3}")


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for group, style in records_by_label(records):
        ns = [r["nodes"] for r in group]
        ax.plot(ns, [r["p50_s"] for r in group], marker="o", linestyle=style, label=f"p50 {group[0]['label']}")
        ax.plot(ns, [r["p99_s"] for r in group], marker="^", linestyle=style, label=f"p99 {group[0]['label']}")
    single = records[0]["single_node_s"]
    ax.axhline(single, color="grey", linewidth=1, label="one node alone")
    ax.axhline(2 * single, color="grey", linewidth=1, linestyle=":", label="2 × one node (target)")
    ax.set_xscale("log")
    ax.set_xlabel("nodes starting at once")
    ax.set_ylabel("time to working set (s, simulated)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def records_by_label(records: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], str]]:
    labels = list(dict.fromkeys(r["label"] for r in records))
    styles = ["-", "--", "-.", ":"]
    return [([r for r in records if r["label"] == label], styles[i % len(styles)]) for i, label in enumerate(labels)]


CALIBRATION_NOTE = (
    "what differs and why: the simulation models the network only (each link's bandwidth, the latency, the "
    "registry's cap) and counts a node ready when its working set is cached. A real node's time also holds "
    "CPU (decompressing and verifying frames, serving FUSE reads and peers, N daemons and containers sharing "
    "this machine's cores), containerd's pull, snapshot preparation and the container's own start and run, "
    "and TCP's ramp-up; its upload counts every byte on the link (headers, health checks, filters). So the "
    "egress and upload ratios should agree; real times are longer, by what CPU and containerd add.")


def calibration_rows(path: Path | None) -> list[dict[str, Any]]:
    """The cold-start records of a `bench/cluster --json` file (every record without a `mode` too)."""
    if path is None:
        return []
    doc = json.loads(path.read_text())
    rows = doc if isinstance(doc, list) else doc.get("records", [doc])
    return [r for r in rows if r.get("mode", "cold") == "cold"]


def calibration_shape(row: dict[str, Any], default: Shape) -> Shape:
    """The real run's links (bench/cluster records its tc rates) or, without them, the flags'."""
    node = row.get("rate_bytes_per_s")
    registry = row.get("registry_rate_bytes_per_s") or node
    if not node:
        return default
    return dataclasses.replace(default, node_mbit=node * 8 / 1e6, registry_mbit=registry * 8 / 1e6)


def calibration_feed(row: dict[str, Any], default: Feed) -> Feed:
    """The image the real run started (its --save-feed directory), else the feed of this run."""
    saved = row.get("feed")
    if saved and (Path(saved) / "toc.json").exists():
        return from_saved(Path(saved))
    return default


def calibrate(args: argparse.Namespace, feed: Feed, config: PeerConfig, shape: Shape) -> list[dict[str, Any]]:
    """Simulate the real run's N, links and image; print simulated beside real, and return both."""
    real = calibration_rows(Path(args.calibrate_json) if args.calibrate_json else None)
    rows = real or [{"nodes": n} for n in (2, 3, 4)]
    fmt = lambda v, unit="": f"{v:.3f}{unit}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    print(f"\ncalibration: simulated vs real (bench/cluster){'' if real else ' — no --calibrate-json: simulated only'}")
    out = []
    shown = ""
    for row in rows:
        n = int(row["nodes"])
        run_shape, run_feed = calibration_shape(row, shape), calibration_feed(row, feed)
        if shown != (shown := f"{run_feed.source} {run_shape}"):
            print(f"  feed: {run_feed.source}; links {run_shape.node_mbit:g} Mbit/s nodes, "
                  f"{run_shape.registry_mbit:g} Mbit/s registry, {run_shape.latency_s * 1000:g} ms")
            print(f"{'N':>3} {'':>5} {'egress':>8} {'p50 ready s':>11} {'max ready s':>11} {'max upload':>10}")
        outcome, _ = simulate(run_feed, config, run_shape, Scenario(n, seed=args.seed))
        sim = {"nodes": n, "egress_ratio": round(outcome.egress_bytes / run_feed.bytes, 4),
               "p50_ready_s": round(percentile(outcome.ready_s, 50), 3), "max_ready_s": round(max(outcome.ready_s), 3),
               "max_upload_ratio": round(max(outcome.uploads, default=0) / run_feed.bytes, 3)}
        keys = ("egress_ratio", "p50_ready_s", "max_ready_s", "max_upload_ratio")
        print(f"{n:>3} {'sim':>5} " + " ".join(f"{fmt(sim[k]):>{w}}" for k, w in zip(keys, (8, 11, 11, 10))))
        if real:
            print(f"{n:>3} {'real':>5} " + " ".join(f"{fmt(row.get(k)):>{w}}" for k, w in zip(keys, (8, 11, 11, 10))))
        out.append({"simulated": sim, "real": {k: row.get(k) for k in ("nodes", *keys)} if real else None})
    print(CALIBRATION_NOTE)
    return out


def choose_feed(args: argparse.Namespace) -> Feed:
    """The flags' feed; by default the realistic image's saved TOC and profile, else synthetic."""
    if args.layout:
        return from_layout(args.layout, args.profile)
    if args.image:
        return from_registry(args.image, args.profile)
    if args.feed or (args.working_set_mib is None and (DEFAULT_FEED / "toc.json").exists()):
        return from_saved(args.feed or DEFAULT_FEED, args.profile)
    if args.working_set_mib is None:
        print(f"warning: no saved feed at {DEFAULT_FEED}: a synthetic 32 MiB working set", file=sys.stderr)
    return synthetic((args.working_set_mib or 32) << 20, args.seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="10,100,1000", help="cluster sizes, comma-separated (default 10,100,1000)")
    parser.add_argument("--feed", type=Path,
                        help=f"a saved feed: a directory with toc.json (+ profile.json), or a TOC file "
                             f"(bench/cluster --save-feed; default {DEFAULT_FEED} when it exists)")
    parser.add_argument("--layout", type=Path, help="a converted image's OCI layout: its TOCs")
    parser.add_argument("--image", help="a seekable image in a registry (insecure HTTP): its TOCs, ranged reads")
    parser.add_argument("--profile", type=Path, help="a startup profile (JSON, the daemon's) giving the reads' order")
    parser.add_argument("--working-set-mib", type=int,
                        help="a synthetic TOC and profile of this working set instead of a real image")
    # 100 Mbit/s and 32 MiB: the time one node takes (2.7 s) is that of a 320 MiB working set at 1 Gbit/s,
    # with 10x fewer frames to simulate (the cost at 1,000 nodes); latencies and deadlines are not scaled
    parser.add_argument("--node-mbit", type=float, default=100.0, help="each node's up and down link (default 100)")
    parser.add_argument("--registry-mbit", type=float, default=250.0, help="the registry's egress cap (default 250)")
    parser.add_argument("--latency-ms", type=float, default=0.5, help="one-way latency between hosts (default 0.5)")
    parser.add_argument("--fanout", type=int, default=PeerConfig().fanout,
                        help=f"peer.fanout (default {PeerConfig().fanout}; 0: one owner per chunk, the old behaviour)")
    parser.add_argument("--compare", action="store_true", help="also run --fanout 0 without hedging (before/after)")
    parser.add_argument("--compare-max-nodes", type=int, default=100,
                        help="--compare: the before runs up to this N only (default 100)")
    parser.add_argument("--churn", type=float, default=0.05, help="share of nodes joining, as many leaving (default 0.05)")
    parser.add_argument("--faulty", type=float, default=0.01, help="share of nodes slow (half) or dead (half) (default 0.01)")
    parser.add_argument("--no-churn", action="store_true", help="skip the churn runs")
    parser.add_argument("--no-faults", action="store_true", help="skip the slow/dead runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes (default 1)")
    parser.add_argument("--json", metavar="FILE", help="write one record per N (and per variant) as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="p50/p99 vs N (needs matplotlib: the bench extra)")
    parser.add_argument("--calibrate", action="store_true", help="print the simulation at N=2-4 beside bench/cluster's")
    parser.add_argument("--calibrate-json", metavar="FILE", help="bench/cluster --json output (nodes, egress_ratio, p50_ready_s, max_ready_s)")
    parser.add_argument("--calibrate-only", action="store_true", help="the calibration alone, no sweep over --nodes")
    args = parser.parse_args()
    try:
        sizes = [int(n) for n in args.nodes.split(",") if n.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"simulate: --nodes wants positive integers, got {args.nodes!r}", file=sys.stderr)
        return EXIT_USAGE
    if sum(x is not None for x in (args.feed, args.layout, args.image, args.working_set_mib)) > 1:
        print("simulate: one of --feed, --layout, --image, --working-set-mib", file=sys.stderr)
        return EXIT_USAGE
    if args.profile and args.working_set_mib is not None:
        print("simulate: --profile needs a real image (--feed, --layout or --image)", file=sys.stderr)
        return EXIT_USAGE
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    feed = choose_feed(args)
    if NO_PROFILE in feed.source:
        print(f"warning: {NO_PROFILE}", file=sys.stderr)
    shape = Shape(node_mbit=args.node_mbit, registry_mbit=args.registry_mbit, latency_s=args.latency_ms / 1000)
    print(f"feed: {feed.source}; working set {feed.bytes / 1e6:.1f} MB")
    print(f"links: nodes {args.node_mbit:g} Mbit/s up and down, registry egress {args.registry_mbit:g} Mbit/s, "
          f"{args.latency_ms:g} ms one way; virtual clock")
    variants = [("after", PeerConfig(fanout=args.fanout))]
    if args.compare:
        variants.append(("before", PeerConfig(fanout=0, hedge_after_s=600.0)))
    if args.calibrate or args.calibrate_json or args.calibrate_only:
        calibrate(args, feed, variants[0][1], shape)
        if args.calibrate_only:
            return 0
    single, wall = simulate(feed, variants[0][1], shape, Scenario(1, seed=args.seed))
    single_s = single.ready_s[0]
    print(f"one node alone on the same link: {single_s:.2f} s (simulated in {wall:.1f} s)")
    # every (variant, N, case) is one independent simulation: --jobs runs them in parallel processes
    cases: dict[tuple[str, int, str], Scenario] = {}
    for label, _ in variants:
        for n in sizes:
            if label == "before" and n > args.compare_max_nodes:
                continue
            cases[(label, n, "base")] = Scenario(n, seed=args.seed)
            if not args.no_churn:  # below 10 nodes 5 % rounds to no event: the record says so (churn_events)
                cases[(label, n, "churn")] = Scenario(n, churn=args.churn, seed=args.seed, churn_window_s=single_s)
            if not args.no_faults and n >= 10:
                cases[(label, n, "faults")] = Scenario(n, faulty=max(args.faulty, 1 / n), seed=args.seed)
    configs = dict(variants)
    results: dict[tuple[str, int, str], tuple[Outcome, float]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(simulate, feed, configs[key[0]], shape, scenario): key for key, scenario in cases.items()}
        for future in as_completed(futures):
            key = futures[future]
            results[key] = future.result()
            outcome, wall = results[key]
            print(f"  [{key[0]}] N={key[1]} {key[2]}: egress {outcome.egress_bytes / feed.bytes:.3f}, "
                  f"p50 {percentile(outcome.ready_s, 50):.2f} s, p99 {percentile(outcome.ready_s, 99):.2f} s, "
                  f"max upload {max(outcome.uploads, default=0) / feed.bytes:.2f} (simulated in {wall:.0f} s wall)",
                  flush=True)
    records: list[dict[str, Any]] = []
    for label, config in variants:
        rows = []
        for n in sizes:
            if (label, n, "base") not in results:
                continue
            got = {case: results[(label, n, case)] for case in ("base", "churn", "faults") if (label, n, case) in results}
            walls = {case: round(wall, 1) for case, (_, wall) in got.items()}
            rec = record(n, feed, single_s, got["base"][0], got.get("churn", (None, 0))[0],
                         got.get("faults", (None, 0))[0], walls, args.churn)
            rec.update(label=label, fanout=config.fanout, hedge_after_s=config.hedge_after_s, feed=feed.source,
                       shape=dataclasses.asdict(shape))
            rows.append(rec)
        records.extend(rows)
        print_table(rows, f"{label}: fanout {config.fanout}, hedge after {config.hedge_after_s:g} s "
                          f"(ratios ÷ the working set; churn {args.churn:.0%} join + {args.churn:.0%} leave; "
                          f"faults {args.faulty:.0%} slow or dead)")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    if args.plot:
        plot(records, Path(args.plot), f"bench/simulate: {feed.source[:60]}, {args.node_mbit:g} Mbit/s nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
