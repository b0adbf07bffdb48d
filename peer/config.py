"""The peer section of peerpull's configuration: cache, fetch tiers, peer server, discovery."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeerConfig:
    node_id: str = ""  # empty: the host name
    cache_dir: str = "/var/lib/peerpull/cache"
    cache_max_bytes: int = 20 << 30
    listen_host: str = "0.0.0.0"
    listen_port: int = 7470
    advertise_host: str = ""  # address peers reach us on; empty: listen_host, or the first non-loopback address
    token: str = ""  # shared cluster token; empty: peer endpoints are open
    discovery: str = "zeroconf"  # zeroconf | static | dns | none
    static_peers: tuple[str, ...] = ()  # host:port of other nodes
    dns_name: str = ""  # e.g. peerpull.kube-system.svc.cluster.local (a headless Service)
    dns_port: int = 7470
    discovery_interval_s: float = 5.0
    health_interval_s: float = 2.0
    peer_timeout_s: float = 10.0
    failure_skip_s: float = 30.0  # a peer that failed is not asked again for this long
    origin_max_inflight: int = 8  # concurrent Range requests per registry
    coalesce_max_bytes: int = 8 << 20  # adjacent chunks merged into one Range request up to this size
    prefetch_parallel: int = 64  # chunks in flight for warm-up/prefetch: queued ones coalesce at the origin
    max_concurrent_serves: int = 64  # peer requests served at once; more wait
