"""`peerpull run --plot FILE.png`: the timeline of one or more runs (pull, container start, first
log line, ready) above the bytes each tier served over time, lazy and normal runs side by side.

Lazy runs have the daemon's per-tier counters sampled during the run (RunResult.tier_samples);
a normal run's bytes are containerd's own download, known only as a total when its pull ends, so
it is drawn as one step at that time. matplotlib is optional (the `bench` extra) and loaded only
here; bench/plot.py draws bench/coldstart's figures dict with the same colours.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converter.format.errors import ConfigError

PHASE_COLOURS = {"pull": "#4c72b0", "container start": "#dd8452", "until first log": "#55a868",
                 "until ready": "#c44e52"}
TIER_COLOURS = {"origin": "#4c72b0", "peer": "#55a868", "cache": "#8172b3", "download": "#c44e52"}
RUN_STYLES = ("-", "--", ":", "-.")


def require_matplotlib() -> None:
    """Before any work: a one-line error instead of a run whose plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'peerpull[bench]' (or matplotlib)") from None


def phases(run: dict[str, Any]) -> list[tuple[float, float, str]]:
    """(start, end, phase) segments of one run from its pull/start/first log/ready times (seconds
    from the start of the pull); a missing or out-of-order mark is skipped."""
    marks = [("pull", run.get("pull_s")), ("container start", run.get("start_s")),
             ("until first log", run.get("first_log_s")), ("until ready", run.get("ready_s"))]
    out, t = [], 0.0
    for phase, end in marks:
        if isinstance(end, (int, float)) and end >= t:
            out.append((t, float(end), phase))
            t = float(end)
    return out


def label(run: dict[str, Any]) -> str:
    image = str(run.get("image", "")).rsplit("/", 1)[-1]
    return f"{run.get('mode_summary') or run.get('mode')}: {image}"


def tier_series(run: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """tier → (times, MB) to draw for one run."""
    samples = run.get("tier_samples") or []
    out: dict[str, tuple[list[float], list[float]]] = {}
    if samples:
        for tier in ("origin", "peer", "cache"):
            if any(s.get(tier, 0.0) for s in samples):
                out[tier] = ([0.0] + [s["t"] for s in samples], [0.0] + [s.get(tier, 0.0) / 1e6 for s in samples])
    download = float((run.get("bytes_by_tier") or {}).get("download", 0.0))
    if download:  # normal mode, or lazy layers that fell back: counted when the pull ended
        end = float(run.get("ready_s") or run.get("pull_s") or 0.0)
        pull = float(run.get("pull_s") or 0.0)
        out["download"] = ([0.0, pull, pull, max(end, pull)], [0.0, 0.0, download / 1e6, download / 1e6])
    return out


def plot_runs(runs: Sequence[dict[str, Any]], path: Path, title: str = "peerpull run") -> Path:
    """Write the PNG for `runs` (RunResult.as_dict() objects) to `path`; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 3.0 + 0.5 * len(runs) + 3.0), dpi=80,
                                  gridspec_kw={"height_ratios": [0.6 + 0.4 * len(runs), 3.0]})
    seen: set[str] = set()
    for y, run in enumerate(reversed(runs)):
        for start, end, phase in phases(run):
            ax.barh(y, end - start, left=start, color=PHASE_COLOURS[phase], label=None if phase in seen else phase)
            seen.add(phase)
        ready = run.get("ready_s")
        if isinstance(ready, (int, float)):
            ax.text(ready, y, f" {ready:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(runs)), [label(r) for r in reversed(runs)], fontsize=8)
    ax.set_xlabel("seconds from the start of the pull")
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.12)  # room for the "N s" labels at the bars' ends
    if seen:
        ax.legend(fontsize=7, loc="lower right")
    drew = False
    for i, run in enumerate(runs):
        for tier, (times, mb) in tier_series(run).items():
            ax2.plot(times, mb, RUN_STYLES[i % len(RUN_STYLES)], color=TIER_COLOURS[tier],
                     label=f"{run.get('mode')}: {tier}")
            drew = True
    ax2.set_xlabel("seconds from the start of the pull")
    ax2.set_ylabel("MB by tier (lazy: uncompressed; download: compressed)", fontsize=8)
    if drew:
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no bytes recorded", ha="center", va="center", transform=ax2.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
