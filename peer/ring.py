"""Rendezvous (highest-random-weight) hashing: every node computes the same owners for a chunk.

The ranking of a chunk's digest over the members also lays out its fan-out tree: the member
ranked first fetches the chunk from the origin, the member at position i ≥ 1 from the one at
(i - 1) // fanout. A hot chunk (every node reads it at the same instant) is then uploaded by many
nodes, `fanout` copies each, instead of N - 1 copies by its one owner; and since every node
computes the same tree from the same members, no tracker is needed. A fetch on another node's
behalf only ever asks members ranked *above* this node: scores do not depend on who else is a
member, so even nodes with different views of the membership never ask each other in a cycle.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Iterable

RANKINGS_KEPT = 4096  # digests whose ranking one ring keeps (a working set's hot part)
STAR = 0  # fanout 0: no tree, every member asks the first-ranked one (one owner per chunk)


def score(member: str, digest: str) -> bytes:
    return hashlib.blake2b(f"{member}\0{digest}".encode(), digest_size=8).digest()


def owners(digest: str, members: Iterable[str], count: int = 1) -> list[str]:
    """The `count` members that own `digest`, best first; stable when other members come and go."""
    scored = sorted(((score(m, digest), m) for m in members), reverse=True)
    return [m for _, m in scored[:count]]


def ranked(digest: str, members: Iterable[str]) -> list[str]:
    """Every member in the order to ask for `digest`."""
    members = list(members)
    return owners(digest, members, len(members))


class Ring:
    """An immutable member set with its rankings memoized: ranking a digest costs O(N log N), and a
    node ranks the same digests again and again (a stream's plan, each fetch, each peer's ask).
    `Ring.of` hands out one object per member set, so processes holding many views (the simulation)
    share the work."""

    _interned: weakref.WeakValueDictionary[frozenset[str], Ring] = weakref.WeakValueDictionary()

    def __init__(self, members: frozenset[str]) -> None:
        self.members = members
        self._rankings: OrderedDict[str, tuple[tuple[str, ...], dict[str, int]]] = OrderedDict()

    @classmethod
    def of(cls, members: Iterable[str]) -> Ring:
        key = frozenset(members)
        ring = cls._interned.get(key)
        if ring is None:
            ring = cls._interned[key] = cls(key)
        return ring

    def _ranking(self, digest: str) -> tuple[tuple[str, ...], dict[str, int]]:
        found = self._rankings.get(digest)
        if found is None:
            order = tuple(ranked(digest, self.members))
            found = self._rankings[digest] = (order, {m: i for i, m in enumerate(order)})
            if len(self._rankings) > RANKINGS_KEPT:
                self._rankings.popitem(last=False)
        else:
            self._rankings.move_to_end(digest)
        return found

    def order(self, digest: str) -> tuple[str, ...]:
        return self._ranking(digest)[0]

    def position(self, digest: str, member: str) -> int:
        return self._ranking(digest)[1][member]

    def ancestors(self, digest: str, member: str, fanout: int) -> list[str]:
        """The members `member` asks for `digest`, nearest first: its parent in the chunk's tree,
        then that one's parent, up to the first-ranked member; empty for the first-ranked member
        itself. With `fanout` STAR, only the first-ranked member (one owner per chunk)."""
        order, index = self._ranking(digest)
        i = index[member]
        if i == 0:
            return []
        if fanout == STAR:
            return [order[0]]
        chain: list[str] = []
        while i > 0:
            i = (i - 1) // fanout
            chain.append(order[i])
        return chain
