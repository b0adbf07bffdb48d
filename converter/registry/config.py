"""The registry section of peerpull's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from converter.settings import setting


@dataclass(frozen=True)
class RegistryConfig:
    """How to talk to OCI registries.

    Loopback registries (127.0.0.0/8, ::1, localhost) always use plain HTTP, as containerd does;
    `insecure_hosts` adds other `host[:port]` names that use plain HTTP.
    """

    insecure_hosts: tuple[str, ...] = ()
    docker_config: str | None = None  # path to a docker config.json; None: $DOCKER_CONFIG or ~/.docker
    platform: str = "linux/amd64"
    connect_timeout_s: float = setting(10.0, lo=0.1, hi=600)
    read_timeout_s: float = setting(60.0, lo=0.1, hi=3600)  # idle: no byte for this long
    retries: int = setting(4, lo=0, hi=20)
    backoff_base_s: float = setting(0.2, lo=0.0, hi=30)
    max_connections_per_host: int = setting(8, lo=1, hi=1024)
    upload_chunk_bytes: int = setting(16 * 1024 * 1024, lo=64 << 10, hi=1 << 30)
