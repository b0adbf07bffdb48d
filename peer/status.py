"""What `GET /v1/status` answers: this node's cache, bytes by tier since start, members, and a
bounded ring of recent warnings and errors (fallbacks among them), for `peerpull status`.

The node daemon adds the images it serves (`images`): the peer component alone has none.
Everything here is read from counters and sets the node keeps anyway; building an answer costs
two cache queries on a worker thread and, with images, one pass over their chunk lists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from peer.cache import ChunkCache
from peer.config import PeerConfig
from peer.membership import Membership
from peer.metrics import TIERS, PeerMetrics

RECENT_EVENTS = 50  # warnings and errors kept for `peerpull status`
EVENT_KEYS = 8  # fields of an event kept beside its name (digests, reasons), each cut short
ImagesReport = Callable[[ChunkCache], Awaitable[list[dict[str, Any]]]]


class EventRing(logging.Handler):
    """The last warnings and errors logged in this process (structlog hands each record's event
    dict to the stdlib root logger, where this handler sits)."""

    def __init__(self, size: int = RECENT_EVENTS) -> None:
        super().__init__(level=logging.WARNING)
        self.events: deque[dict[str, Any]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = record.msg if isinstance(record.msg, dict) else {"event": record.getMessage()}
            item: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                                    "event": str(fields.get("event", ""))[:100]}
            for key, value in list(fields.items())[:EVENT_KEYS + 4]:
                if key not in item and not key.startswith("_") and key not in ("timestamp", "log_level"):
                    item[key] = value if isinstance(value, (int, float, bool)) or value is None else str(value)[:300]
            self.events.append(item)
        except Exception:  # a log record must never fail the code that logged it
            self.handleError(record)

    def __enter__(self) -> EventRing:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)


class NodeStatus:
    def __init__(self, node_id: str, config: PeerConfig, metrics: PeerMetrics, cache: ChunkCache,
                 membership: Membership, events: EventRing) -> None:
        self._node_id = node_id
        self._config = config
        self._metrics = metrics
        self._cache = cache
        self._membership = membership
        self._events = events
        self._started = time.time()
        self.images: ImagesReport | None = None  # set by the node daemon

    def _counter(self, counter: Any, *labels: str) -> float:
        return float(counter.labels(*labels)._value.get() if labels else counter._value.get())

    def _members(self) -> list[dict[str, Any]]:
        alive = {m.node_id for m in self._membership.alive()}
        now = time.monotonic()
        out: list[dict[str, Any]] = [{"node_id": self._node_id, "address": "(this node)", "healthy": True,
                                      "self": True}]
        members, candidates = self._membership.known()
        for m in sorted(members, key=lambda m: m.node_id):
            out.append({"node_id": m.node_id, "address": m.address, "healthy": m.node_id in alive,
                        "last_ok_s_ago": round(now - m.last_ok, 1), "skipped": m.skip_until > now, "self": False})
        # configured or discovered addresses that answer no health check (left, or never joined)
        answering = {m.address for m in members}
        for address in sorted(candidates - answering):
            out.append({"node_id": "", "address": address, "healthy": False, "last_ok_s_ago": None,
                        "skipped": False, "self": False})
        return out

    async def snapshot(self) -> dict[str, Any]:
        volume, chunks = await asyncio.to_thread(lambda: (self._cache.volume(), self._cache.count()))
        requests = {t: self._counter(self._metrics.requests, t) for t in TIERS}
        total = sum(requests.values())
        images = await self.images(self._cache) if self.images is not None else []
        return {
            "node_id": self._node_id,
            "started": round(self._started, 3),
            "uptime_s": round(time.time() - self._started, 1),
            "cache": {"dir": self._config.cache_dir, "bytes": volume, "limit_bytes": self._config.cache_max_bytes,
                      "chunks": chunks},
            "hit_ratio": requests["cache"] / total if total else 0.0,
            "tiers": {t: int(self._counter(self._metrics.bytes, t)) for t in TIERS},
            "tier_chunks": {t: int(requests[t]) for t in TIERS},
            "tier_wire_bytes": {t: int(self._counter(self._metrics.wire_bytes, t)) for t in TIERS},
            "served_bytes": int(self._counter(self._metrics.served_bytes)),
            "fuse_reads": int(self._counter(self._metrics.fuse_reads)),
            "members": self._members(),
            "images": images,
            "events": list(self._events.events)[::-1],  # newest first
        }
