"""Which registries this node fetches from on another node's behalf.

A peer's chunk request names where the origin has the chunk; fetching from whatever host it names
would let anyone on the network point this node at any address (blind SSRF), and a silent host
would hold its serving slots. So a miss is fetched only from a registry the operator configured
(`peer.trusted_registries`, `"*"` for any) or one this node's own, local callers use (the
snapshotter resolving layers for its containerd, a warm-up asked on loopback): those are learned.
"""

from __future__ import annotations

import structlog

from converter.registry.reference import ImageReference

log = structlog.get_logger(__name__)
ANY = "*"
MAX_LEARNED = 1024  # a node talks to a handful of registries; bound the set all the same


def registry_of(repository: str) -> str:
    """host[:port] of a `registry/repository` (as a ChunkRef names it), "" if it cannot be parsed."""
    try:
        return ImageReference.parse(repository).registry
    except Exception:  # any malformed name is simply not trusted
        return ""


class OriginPolicy:
    def __init__(self, trusted: tuple[str, ...]) -> None:
        self._any = ANY in trusted
        self._trusted = frozenset(t.lower() for t in trusted if t != ANY)
        self._learned: set[str] = set()

    def learn(self, registry: str) -> None:
        """A registry this node's own caller (its snapshotter, a local warm-up) fetches from."""
        registry = registry.lower()
        if registry and registry not in self._trusted and registry not in self._learned \
                and len(self._learned) < MAX_LEARNED:
            self._learned.add(registry)
            log.info("origin_trusted", registry=registry, source="local")

    def allows(self, registry: str) -> bool:
        registry = registry.lower()
        return bool(registry) and (self._any or registry in self._trusted or registry in self._learned)

    def allows_repository(self, repository: str) -> bool:
        return self.allows(registry_of(repository))
