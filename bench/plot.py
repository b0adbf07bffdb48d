"""bench/coldstart's PNG: a timeline per mode (pull, container start, first log line, ready) and,
when the daemon's metrics were sampled during the cold lazy run, bytes by tier over time.

matplotlib is a bench-only extra (`pip install -e '.[bench]'`); nothing else imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peerpull.run_plot import phases

# (label, key prefix) of the timeline's rows, top to bottom
MODES = (("normal", "normal"), ("lazy, cold", "lazy"), ("lazy, warm peer", "lazy_peer"),
         ("normal, 2nd start", "normal_second"), ("lazy, 2nd start", "lazy_second"))


def _phases(figures: dict[str, Any], prefix: str) -> list[tuple[float, float, str]]:
    """(start, end, phase) segments of one mode, cut as `peerpull run --plot` cuts one run's."""
    # a second start's `_start_s` is its time to ready (the row's figure): its container start has its own key
    started = figures.get(f"{prefix}_container_start_s", figures.get(f"{prefix}_start_s"))
    return phases({"pull_s": figures.get(f"{prefix}_pull_s"), "start_s": started,
                   "first_log_s": figures.get(f"{prefix}_first_log_s"), "ready_s": figures.get(f"{prefix}_ready_s")})


def plot_figures(figures: dict[str, Any], path: Path) -> Path:
    """Write the PNG to `path` from a figures dict (bench/coldstart's JSON); returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = figures.get("lazy_tier_samples") or []
    rows = [(label, prefix) for label, prefix in MODES if _phases(figures, prefix)]
    fig, axes = plt.subplots(2 if samples else 1, 1, figsize=(8, 5.5 if samples else 3.2), dpi=80, squeeze=False)
    ax = axes[0][0]
    colours = {"pull": "#4c72b0", "container start": "#dd8452", "until first log": "#55a868", "until ready": "#c44e52"}
    seen: set[str] = set()
    for y, (_label, prefix) in enumerate(reversed(rows)):
        for start, end, phase in _phases(figures, prefix):
            ax.barh(y, end - start, left=start, color=colours[phase], label=None if phase in seen else phase)
            seen.add(phase)
        ready = figures.get(f"{prefix}_ready_s")
        if isinstance(ready, (int, float)):
            ax.text(ready, y, f" {ready:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    ax.set_xlabel("seconds from the start of the pull")
    title = f"bench/coldstart: {figures.get('image', 'image')}\n{figures.get('link', '')}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if samples:
        ax2 = axes[1][0]
        times = [s["t"] for s in samples]
        for tier in ("origin", "peer", "cache"):
            ax2.plot(times, [s.get(tier, 0.0) / 1e6 for s in samples], label=tier)
        ax2.set_xlabel("seconds from the start of the pull (lazy, cold; round 1)")
        ax2.set_ylabel("MB (uncompressed) by tier")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
