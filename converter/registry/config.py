"""The registry section of peerpull's configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryConfig:
    """How to talk to OCI registries.

    Loopback registries (127.0.0.0/8, ::1, localhost) always use plain HTTP, as containerd does;
    `insecure_hosts` adds other `host[:port]` names that use plain HTTP.
    """

    insecure_hosts: tuple[str, ...] = ()
    docker_config: str | None = None  # path to a docker config.json; None: $DOCKER_CONFIG or ~/.docker
    platform: str = "linux/amd64"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    retries: int = 4
    backoff_base_s: float = 0.2
    max_connections_per_host: int = 8
    upload_chunk_bytes: int = 16 * 1024 * 1024
