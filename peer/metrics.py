"""Prometheus metrics of one node: per-tier requests, bytes, errors and latency; cache; members."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

TIERS = ("cache", "peer", "origin")


def parse_exposition(text: str) -> dict[str, float]:
    """A /metrics page as `name{labels}` → value (what benchmarks, `peerpull run` and tests read)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def by_tier(metrics: dict[str, float], name: str) -> dict[str, float]:
    """One per-tier counter of a parsed page, e.g. by_tier(m, "peerpull_chunk_bytes_total")."""
    return {tier: metrics.get(f'{name}{{tier="{tier}"}}', 0.0) for tier in TIERS}


class _RegistryFaults(Collector):
    """Exposes the registry client's own fault counter (timeouts, refused sizes, retries, HTTP
    statuses) as it stands at each scrape: the client counts, the metrics only read."""

    def __init__(self, faults: Mapping[str, int]) -> None:
        self._faults = faults

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("peerpull_registry_faults", "Registry faults met, by kind (each retry too)",
                                     labels=["kind"])
        for kind, count in sorted(dict(self._faults).items()):
            family.add_metric([kind], count)
        yield family


def resident_bytes() -> int:
    """This process's resident set (VmRSS), 0 where /proc does not say."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Memory(Collector):
    """What each bounded buffer holds, read at each scrape (the holders count, the metrics only read),
    and the process's resident size beside it."""

    def __init__(self) -> None:
        self.holders: dict[str, Callable[[], int]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("peerpull_memory_bytes", "Bytes held by each bounded buffer", labels=["holder"])
        for holder, held in sorted(self.holders.items()):
            family.add_metric([holder], held())
        yield family
        yield GaugeMetricFamily("peerpull_resident_bytes", "Resident memory of the daemon (VmRSS)",
                                value=resident_bytes())


class PeerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("peerpull_chunk_requests", "Chunks obtained, by the tier that produced them",
                                ["tier"], registry=r)
        self.bytes = Counter("peerpull_chunk_bytes", "Uncompressed chunk bytes obtained, by tier", ["tier"], registry=r)
        self.wire_bytes = Counter("peerpull_chunk_wire_bytes", "Compressed bytes moved over the network, by tier",
                                  ["tier"], registry=r)
        self.errors = Counter("peerpull_chunk_errors", "Failed attempts, by tier and reason", ["tier", "reason"],
                              registry=r)
        self.latency = Histogram("peerpull_chunk_fetch_seconds", "Time to obtain a chunk, by tier", ["tier"],
                                 registry=r, buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self.served = Counter("peerpull_served_chunks", "Chunks this node served to peers, by where it got them",
                              ["source"], registry=r)
        self.served_bytes = Counter("peerpull_served_bytes", "Compressed bytes this node served to peers",
                                    registry=r)
        self.refused = Counter("peerpull_peer_requests_refused", "Peer requests refused, by reason", ["reason"],
                               registry=r)
        self.cache_bytes = Gauge("peerpull_cache_bytes", "Bytes in the local chunk cache", registry=r)
        self.cache_hit_ratio = Gauge("peerpull_cache_hit_ratio", "Share of chunks served from the local cache",
                                     registry=r)
        self.fuse_reads = Counter("peerpull_fuse_reads", "FUSE read requests served by this node's mount",
                                  registry=r)
        self.members = Gauge("peerpull_members", "Live members of the hash ring, this node included", registry=r)
        # the CRI image proxy (snapshotter/cri/): calls forwarded, and the credentials kept from pulls
        self.cri_requests = Counter("peerpull_cri_requests", "CRI image-service calls forwarded to containerd, "
                                    "by method and gRPC status code", ["method", "code"], registry=r)
        self.cri_credentials = Gauge("peerpull_cri_credentials", "Live registry credentials from CRI PullImage "
                                     "(per repository and per registry host)", registry=r)
        self._memory = _Memory()
        r.register(self._memory)

    def watch_memory(self, holders: Mapping[str, Callable[[], int]]) -> None:
        """Publish each holder's bytes (a cheap callable) as peerpull_memory_bytes{holder}."""
        self._memory.holders.update(holders)

    def watch_registry_faults(self, faults: Mapping[str, int]) -> None:
        """Publish `faults` (RegistryClient.faults) as peerpull_registry_faults_total{kind}."""
        self.registry.register(_RegistryFaults(faults))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def update_hit_ratio(self) -> None:
        counts = {t: self.requests.labels(t)._value.get() for t in TIERS}
        total = sum(counts.values())
        self.cache_hit_ratio.set(counts["cache"] / total if total else 0.0)
