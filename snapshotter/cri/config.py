"""The cri section of peerpull's configuration: the CRI image-service proxy that kubelet calls
(`--image-service-endpoint`) so the credentials of `imagePullSecrets` reach the daemon."""

from __future__ import annotations

from dataclasses import dataclass

from converter.format.settings import setting


@dataclass(frozen=True)
class CriConfig:
    # serve CRI's ImageService (runtime.v1) on `socket`, forwarding every call to containerd's CRI and
    # keeping PullImage's registry credentials in memory for lazy reads (docs/security.md)
    image_proxy: bool = False
    socket: str = "/run/peerpull/cri-image.sock"  # what kubelet's --image-service-endpoint names
    # containerd's CRI endpoint; empty: snapshotter.containerd_address (CRI is served on containerd's socket)
    containerd_socket: str = ""
    # how long credentials of a pull are used for lazy reads; every pull of the image renews them
    credential_ttl_s: float = setting(3600.0, lo=1.0, hi=30 * 86400)
