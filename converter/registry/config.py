"""The registry section of peerpull's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from converter.format.settings import setting

DEFAULT_PLATFORM = "linux/amd64"


@dataclass(frozen=True)
class RegistryConfig:
    """How to talk to OCI registries.

    Loopback registries (127.0.0.0/8, ::1, localhost) always use plain HTTP, as containerd does;
    `insecure_hosts` adds other `host[:port]` names that use plain HTTP.

    Deadlines: every connection attempt has `connect_timeout_s`; every read waits at most
    `read_timeout_s` for the next byte. Bounded requests (manifests, configs, TOC and chunk ranges,
    HEAD, the control requests of a push) must finish, retries included, within
    `request_deadline_s`. Whole-blob downloads have no total deadline (layers are GBs): they resume
    after a stall, and a stream slower than `min_speed_bytes_s` over a `read_timeout_s` window is a stall.
    """

    insecure_hosts: tuple[str, ...] = ()
    docker_config: str | None = None  # path to a docker config.json; None: $DOCKER_CONFIG or ~/.docker
    # "" (the default): linux/amd64 from a multi-platform index, a single-platform image as it is;
    # set explicitly, a single-platform image of another platform is an error
    platform: str = ""
    connect_timeout_s: float = setting(10.0, lo=0.05, hi=600)
    read_timeout_s: float = setting(20.0, lo=0.05, hi=3600)  # idle: no byte for this long
    request_deadline_s: float = setting(60.0, lo=0.1, hi=3600)  # a bounded request, retries included
    min_speed_bytes_s: int = setting(16 << 10, lo=1, hi=1 << 30)  # a blob stream slower than this stalls
    retries: int = setting(4, lo=0, hi=20)
    backoff_base_s: float = setting(0.2, lo=0.0, hi=30)
    backoff_max_s: float = setting(10.0, lo=0.0, hi=300)  # no single wait between retries is longer
    max_connections_per_host: int = setting(8, lo=1, hi=1024)
    upload_chunk_bytes: int = setting(16 * 1024 * 1024, lo=64 << 10, hi=1 << 30)

    @property
    def index_platform(self) -> str:
        """The platform to pick from a multi-platform index."""
        return self.platform or DEFAULT_PLATFORM
