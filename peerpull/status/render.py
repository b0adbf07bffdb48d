"""A node's status page (peer/status.py's answer) as lines for a person."""

from __future__ import annotations

import time
from typing import Any

from peer.metrics import TIERS

SHOWN_EVENTS = 10


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def locality_line(image: dict[str, Any]) -> str:
    """`IMAGE: 34.5 % local (12 of 40 chunks, 1.2 MiB of 3.4 MiB), 3 layers`."""
    return (f"{image.get('image')}: {100 * float(image.get('local_ratio', 0)):.1f} % local "
            f"({image.get('chunks_local', 0)} of {image.get('chunks', 0)} chunks, {size(image.get('bytes_local', 0))} "
            f"of {size(image.get('bytes', 0))}), {image.get('layers', 0)} lazy layers")


def _event_line(event: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.gmtime(float(event.get("time", 0))))
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "level", "event"))
    return f"  {when} {event.get('level', '')} {event.get('event', '')} {rest}"[:300]


def render(status: dict[str, Any], node: str) -> list[str]:
    cache = status.get("cache", {})
    tiers = status.get("tiers", {})
    members = status.get("members", [])
    healthy = sum(1 for m in members if m.get("healthy"))
    lines = [
        f"node    {status.get('node_id')} at {node}, up {status.get('uptime_s', 0):.0f} s",
        f"cache   {size(cache.get('bytes', 0))} of {size(cache.get('limit_bytes', 0))} ({cache.get('chunks', 0)} chunks) "
        f"in {cache.get('dir')}; hit ratio {100 * float(status.get('hit_ratio', 0)):.1f} %",
        "tiers   " + ", ".join(f"{t} {size(tiers.get(t, 0))}" for t in TIERS)
        + f" since start (uncompressed); served to peers {size(status.get('served_bytes', 0))}",
        f"members {len(members)}, {healthy} healthy",
    ]
    for m in members:
        mark = "ok  " if m.get("healthy") else "DOWN"
        seen = m.get("last_ok_s_ago")
        extra = "" if m.get("self") else f" {m.get('address')}, " + (
            f"last answer {seen} s ago" if seen is not None else "no answer to health checks")
        extra += " (skipped after a failure)" if m.get("skipped") else ""
        lines.append(f"  {mark} {m.get('node_id')}{' (this node)' if m.get('self') else ''}{extra}")
    images = status.get("images", [])
    lines.append(f"images  {len(images)}" + ("" if images else " (none pulled lazily, or not a node daemon)"))
    lines += [f"  {locality_line(i)}" for i in images]
    events = status.get("events", [])
    lines.append(f"recent warnings and errors: {len(events)}" + (" (newest first)" if events else ""))
    lines += [_event_line(e) for e in events[:SHOWN_EVENTS]]
    return lines
