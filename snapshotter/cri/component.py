"""The CRI image proxy as a daemon component: the credential store handed to the registry client,
the proxy listening, and its teardown registered on the daemon's exit stack."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

from converter.registry.credential_store import CredentialStore
from converter.registry.transport import RegistryTransport
from peer.metrics import PeerMetrics
from snapshotter.cri.config import CriConfig
from snapshotter.cri.proxy import CriImageProxy


async def start_cri_proxy(stack: AsyncExitStack, config: CriConfig, registry: RegistryTransport,
                          containerd_address: str, metrics: PeerMetrics) -> CriImageProxy | None:
    """Serve the proxy when `cri.image_proxy` is on (None otherwise); stopped when `stack` unwinds."""
    if not config.image_proxy:
        return None
    store = CredentialStore(config.credential_ttl_s)
    registry.use_credentials(store)
    metrics.cri_credentials.set_function(lambda: len(store))
    proxy = CriImageProxy(store, config.containerd_socket or containerd_address, metrics.cri_requests)
    await proxy.start(Path(config.socket))
    stack.push_async_callback(proxy.stop)
    return proxy
