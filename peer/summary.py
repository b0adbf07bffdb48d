"""What a node holds, in a fixed-size Bloom filter its peers fetch: a node asks a peer that holds a
chunk before the origin, even for chunks it owns on the ring.

Fixed parameters (2^20 bits = 128 KiB, 4 probes) so that a received filter is validated by its
length alone. Bits come straight from the chunk digest (sha256 is already uniform). At 100,000
chunks the false-positive rate is about 1%; a false positive costs the peer one origin fetch it
makes for us, never a wrong byte (the receiver verifies). Entries are never removed: evicted
chunks stay "maybe" until the node restarts, with the same cost as a false positive.
"""

from __future__ import annotations

import threading

FILTER_BITS = 1 << 20
FILTER_BYTES = FILTER_BITS // 8
PROBES = 4
_SLICE = 5  # hex digits per probe: 20 bits


def _probes(digest: str) -> list[int]:
    hexpart = digest.removeprefix("sha256:")
    return [int(hexpart[i * _SLICE:(i + 1) * _SLICE], 16) for i in range(PROBES)]


def _valid(digest: str) -> bool:
    return digest.startswith("sha256:") and len(digest) == 71


class DigestFilter:
    """A Bloom filter of chunk digests; `generation` changes whenever a digest is added."""

    def __init__(self, bits: bytes | None = None) -> None:
        if bits is not None and len(bits) != FILTER_BYTES:
            raise ValueError(f"a digest filter is {FILTER_BYTES} bytes, not {len(bits)}")
        self._bits = bytearray(bits if bits is not None else FILTER_BYTES)
        self._lock = threading.Lock()  # adds come from the event loop and the cache's store thread
        self.generation = 0

    def add(self, digest: str) -> None:
        if not _valid(digest):
            return
        with self._lock:
            changed = False
            for bit in _probes(digest):
                byte, mask = bit >> 3, 1 << (bit & 7)
                if not self._bits[byte] & mask:
                    self._bits[byte] |= mask
                    changed = True
            if changed:
                self.generation += 1

    def might_hold(self, digest: str) -> bool:
        if not _valid(digest):
            return False
        bits = self._bits
        return all(bits[bit >> 3] & (1 << (bit & 7)) for bit in _probes(digest))

    def to_bytes(self) -> bytes:
        with self._lock:
            return bytes(self._bits)
