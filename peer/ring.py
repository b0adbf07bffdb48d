"""Rendezvous (highest-random-weight) hashing: every node computes the same owners for a chunk."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def owners(digest: str, members: Iterable[str], count: int = 1) -> list[str]:
    """The `count` members that own `digest`, best first; stable when other members come and go."""
    scored = sorted(((hashlib.blake2b(f"{m}\0{digest}".encode(), digest_size=8).digest(), m) for m in members),
                    reverse=True)
    return [m for _, m in scored[:count]]


def ranked(digest: str, members: Iterable[str]) -> list[str]:
    """Every member in the order to ask for `digest`."""
    members = list(members)
    return owners(digest, members, len(members))
