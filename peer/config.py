"""The peer section of peerpull's configuration: cache, fetch tiers, peer server, discovery."""

from __future__ import annotations

from dataclasses import dataclass

from converter.format.settings import setting

DISCOVERY_MODES = ("zeroconf", "static", "dns", "none")


@dataclass(frozen=True)
class PeerConfig:
    node_id: str = ""  # empty: the host name
    cache_dir: str = "/var/lib/peerpull/cache"
    cache_max_bytes: int = setting(20 << 30, lo=64 << 20)
    # verified frames waiting to be written to the disk cache (in batches); beyond it streams wait
    cache_write_pending_bytes: int = setting(16 << 20, lo=1 << 20, hi=4 << 30)
    listen_host: str = "0.0.0.0"
    listen_port: int = setting(7470, lo=0, hi=65535)
    advertise_host: str = ""  # address peers reach us on; empty: listen_host, or the first non-loopback address
    token: str = ""  # shared cluster token; empty: refused on a non-loopback listener unless insecure_no_token
    insecure_no_token: bool = False  # explicit opt-in to an open peer server on a non-loopback address
    # registries (host[:port]) this node fetches from when a peer asks; "*" trusts any. Registries this
    # node's own snapshotter resolves layers from are trusted as well (learned at run time)
    trusted_registries: tuple[str, ...] = ()
    discovery: str = setting("zeroconf", choices=DISCOVERY_MODES)
    static_peers: tuple[str, ...] = ()  # host:port of other nodes
    dns_name: str = ""  # e.g. peerpull.kube-system.svc.cluster.local (a headless Service)
    dns_port: int = setting(7470, lo=1, hi=65535)
    discovery_interval_s: float = setting(5.0, lo=0.05, hi=3600)
    health_interval_s: float = setting(2.0, lo=0.05, hi=3600)
    peer_timeout_s: float = setting(10.0, lo=0.05, hi=600)  # overall deadline of one request to a peer
    peer_connect_timeout_s: float = setting(2.0, lo=0.05, hi=120)
    peer_read_timeout_s: float = setting(5.0, lo=1.0, hi=600)  # idle: no byte from the peer (it sends heartbeats)
    failure_skip_s: float = setting(30.0, lo=0.0, hi=3600)  # a peer that failed is not asked again for this long
    # a chunk's fan-out tree (peer/ring.py): each node serves it to this many others; 0: one owner serves all
    fanout: int = setting(4, lo=0, hi=1024)
    # a second peer is asked when the first has not answered by max(this, 4 × the recent answer time)
    hedge_after_s: float = setting(0.5, lo=0.001, hi=600)
    origin_max_inflight: int = setting(8, lo=1, hi=1024)  # concurrent Range requests per registry
    # adjacent chunks merged into one Range request up to this size
    coalesce_max_bytes: int = setting(8 << 20, lo=64 << 10, hi=256 << 20)
    # chunks in flight for warm-up/prefetch: queued ones coalesce at the origin
    prefetch_parallel: int = setting(64, lo=1, hi=4096)
    # streams (startup profiles, background streaming of an image): Range requests of up to
    # coalesce_max_bytes in flight at once, and the bytes they may hold in memory, for all streams
    stream_parallel: int = setting(4, lo=1, hi=256)
    # (32 MiB: four 8 MiB Range requests; a stream still ran at the link's 117 MB/s with it)
    stream_max_bytes_in_flight: int = setting(32 << 20, lo=1 << 20, hi=4 << 30)
    # peer server: misses that need the origin get their own slots and deadline (cache hits never wait
    # behind them); bytes being answered are bounded per connection and in total
    max_concurrent_serves: int = setting(64, lo=1, hi=4096)  # origin fetches for peers at once; more wait
    serve_origin_timeout_s: float = setting(30.0, lo=0.1, hi=600)  # a peer's miss gives up after this
    serve_connection_bytes: int = setting(32 << 20, lo=1 << 20, hi=1 << 30)
    # 64 MiB: 16 MiB for each of four peers at once is above a 10 Gbit link × 5 ms RTT (6 MB)
    serve_total_bytes: int = setting(64 << 20, lo=4 << 20, hi=16 << 30)
    # cache hits a peer asks for that are stored in files of their own (frames of 32 KiB and more) go
    # from the file to the socket with sendfile, not through this process's memory
    serve_sendfile: bool = True
    max_connections: int = setting(2048, lo=16, hi=100_000)  # over it, the oldest idle connection is closed
    header_timeout_s: float = setting(10.0, lo=0.1, hi=600)  # a connection must send a whole request by then
    warm_progress_s: float = setting(5.0, lo=0.05, hi=600)  # /v1/warm writes a progress line this often
    # a warm-up fetches only this node's ring share from the registry and the rest from its owners
    # once they have it (peer/warm.py); false: every chunk the ordinary way
    warm_split: bool = True
    # split warm-up: when no owner produced a chunk waited for in this long, the rest go the ordinary way
    warm_owner_wait_s: float = setting(30.0, lo=0.5, hi=3600)
