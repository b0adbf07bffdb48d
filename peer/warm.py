"""Warm-up and prefetch: every chunk of an image through the ordinary fetch path, in parallel.

Across a cluster the work is split by the hash ring (`split`): each node fetches from the registry
only the chunks it owns (its share, about 1/N of the image), and takes each other chunk from its
owner once the owner's holdings filter says it has it, so a peer is never asked for a chunk it
must first fetch itself (the requests that time out on busy nodes and end at the registry a
second time). Both run at once: the node's downlink carries its share and the others' shares
together, so a warm-up takes about image ÷ (N × link) plus one share. A chunk whose owner left
the ring, or that no owner produced for `owner_wait_s` (nothing new appeared in that time), goes
the ordinary way: the owner (which fetches it) or the registry.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from converter.format.annotations import is_seekable_descriptor
from converter.format.layer_reader import location_from_annotations, read_toc
from converter.format.toc import Toc
from converter.registry.blob_reader import RegistryBlobReader
from converter.registry.client import RegistryClient
from converter.registry.manifest import parse_manifest
from converter.registry.reference import ImageReference
from peer.chunk import ChunkRef
from peer.client import PeerFetchError
from peer.fetcher import ChunkFetcher
from peer.ring import owners
from peer.summary import DigestFilter

POLL_S = 0.2  # how often the chunks waited for are checked against the owners' filters


@dataclass
class WarmProgress:
    """What a warm-up has done so far (the node's /v1/warm streams it)."""

    stage: str = "resolving"  # resolving (manifest, TOCs) → fetching
    chunks: int = 0  # to fetch
    done: int = 0
    bytes: int = 0
    share: int = 0  # split warm-up: chunks this node owns (fetched from the registry)
    waiting: int = 0  # split warm-up: chunks waited for, until their owner has them

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def image_chunks(client: RegistryClient, image: str) -> tuple[list[ChunkRef], int]:
    """The distinct chunks of an image's seekable layers, and how many layers were not seekable."""
    ref = ImageReference.parse(image)
    fetched, _ = await client.resolve_image(ref)
    manifest = parse_manifest(fetched.body, fetched.media_type, str(ref))
    repository = f"{ref.registry}/{ref.repository}"
    chunks: dict[str, ChunkRef] = {}
    skipped = 0
    for desc in manifest["layers"]:
        if not is_seekable_descriptor(desc):
            skipped += 1
            continue
        reader = RegistryBlobReader(client, ref, desc["digest"], desc["size"])
        _, toc = await read_toc(reader, location_from_annotations(desc.get("annotations")))
        for chunk_ref in layer_refs(toc, repository, desc["digest"]):
            chunks.setdefault(chunk_ref.digest, chunk_ref)
    return list(chunks.values()), skipped


def layer_refs(toc: Toc, repository: str, blob: str) -> list[ChunkRef]:
    """One ref per distinct frame of a layer, in blob order: in format v2 several files' chunks
    share a frame (same blob offset), which is fetched once."""
    frames = sorted({c.blob_offset: c for e in toc.entries for c in e.chunks}.values(), key=lambda c: c.blob_offset)
    return [ChunkRef.from_chunk(chunk, repository, blob, following.blob_offset if following is not None else 0)
            for chunk, following in zip(frames, [*frames[1:], None])]


class RingMember(Protocol):
    node_id: str
    address: str
    holds: DigestFilter | None


class RingView(Protocol):
    """What a split warm-up reads of the membership (peer/membership.py)."""

    node_id: str

    def ring_members(self) -> list[str]: ...

    def alive(self) -> Sequence[RingMember]: ...


@dataclass(frozen=True)
class Split:
    ring: RingView
    owner_wait_s: float  # give up waiting for owners when none produced a chunk for this long
    # a member's holdings filter, fetched now (PeerClient.summary); None: the membership's copies only
    summary: Callable[[str], Awaitable[bytes]] | None = None


def summary_every(members: int) -> float:
    """Seconds between direct fetches of the filters waited on: the membership refreshes them at
    most every 1-10 s (it must stay cheap all the time), too late for a warm-up of a few seconds;
    a warm-up polls them itself while it waits, at most about 512 KB/s of filters per node whatever
    the cluster's size (128 KiB each)."""
    return max(0.25, 0.25 * (members - 1))


class _Holdings:
    """Who holds what, for a split warm-up: the filters it fetched itself, else the membership's."""

    def __init__(self, split: Split, members: int) -> None:
        self._split = split
        self._fetched: dict[str, DigestFilter] = {}
        self._every = summary_every(members)
        self._next = 0.0

    async def refresh(self, owners_waited: set[str], alive: dict[str, RingMember]) -> None:
        fetch = self._split.summary
        if fetch is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self._every
        ids = [node_id for node_id in owners_waited if node_id in alive]
        results = await asyncio.gather(*(fetch(alive[node_id].address) for node_id in ids), return_exceptions=True)
        for node_id, result in zip(ids, results):
            if isinstance(result, bytes):
                self._fetched[node_id] = DigestFilter(result)
            elif isinstance(result, PeerFetchError):
                self._fetched.pop(node_id, None)  # the membership's copy, or wait; it may be leaving
            elif isinstance(result, BaseException):
                raise result

    def has(self, member: RingMember, digest: str) -> bool:
        fetched = self._fetched.get(member.node_id)
        if fetched is not None and fetched.might_hold(digest):
            return True
        return member.holds is not None and member.holds.might_hold(digest)


def shares(refs: list[ChunkRef], node_id: str, members: list[str]) -> tuple[list[ChunkRef], dict[str, str]]:
    """(the chunks `node_id` owns, owner of every other chunk by digest) over the ring `members`."""
    mine: list[ChunkRef] = []
    owner_of: dict[str, str] = {}
    for ref in refs:
        owner = owners(ref.digest, members)[0]
        if owner == node_id:
            mine.append(ref)
        else:
            owner_of[ref.digest] = owner
    return mine, owner_of


async def warm(fetcher: ChunkFetcher, refs: list[ChunkRef], parallel: int,
               progress: WarmProgress | None = None, split: Split | None = None) -> dict[str, object]:
    """Fetch every chunk in `refs` (at most `parallel` at once from each source); a summary by
    serving tier. With `split`, by ring share (see the module's docstring).

    A chunk already cached is not read (it was verified when it came in); a fetched one is verified
    once, by the fetcher, and lands in the cache.
    """
    started = time.monotonic()
    tiers: Counter[str] = Counter()
    progress = progress or WarmProgress()
    progress.stage, progress.chunks = "fetching", len(refs)
    total = 0

    async def one(ref: ChunkRef, slots: asyncio.Semaphore) -> None:
        nonlocal total
        async with slots:
            tier = await fetcher.ensure(ref, use_peers=True, background=False)
        tiers[tier] += 1
        total += ref.length
        progress.done += 1
        progress.bytes = total

    members = split.ring.ring_members() if split is not None else []
    report: dict[str, object] = {}
    async with asyncio.TaskGroup() as group:
        if split is None or len(members) < 2:
            slots = asyncio.Semaphore(parallel)
            for ref in refs:
                group.create_task(one(ref, slots))
        else:
            mine, owner_of = shares(refs, split.ring.node_id, members)
            progress.share = len(mine)
            own_slots, peer_slots = asyncio.Semaphore(parallel), asyncio.Semaphore(parallel)
            for ref in mine:
                group.create_task(one(ref, own_slots))
            others = [ref for ref in refs if ref.digest in owner_of]
            fallbacks = await _from_owners(others, owner_of, split, _Holdings(split, len(members)), progress,
                                           lambda ref: group.create_task(one(ref, peer_slots)))
            report.update({"share": len(mine), "ring_members": len(members), "fallbacks": fallbacks})
    await fetcher.flush()  # warmed means: in this node's disk cache
    return {"chunks": len(refs), "bytes": total, "tiers": dict(tiers), **report,
            "seconds": round(time.monotonic() - started, 3)}


async def _from_owners(refs: list[ChunkRef], owner_of: dict[str, str], split: Split, holdings: _Holdings,
                       progress: WarmProgress, start: Callable[[ChunkRef], object]) -> int:
    """Start each chunk's fetch once its owner holds it (or left the ring, or kept nothing new
    coming for `owner_wait_s`); how many went the ordinary way after the wait."""
    pending = refs
    last_new = time.monotonic()
    fallbacks = 0
    while pending:
        alive = {m.node_id: m for m in split.ring.alive()}
        await holdings.refresh({owner_of[ref.digest] for ref in pending}, alive)
        waiting: list[ChunkRef] = []
        for ref in pending:
            member = alive.get(owner_of[ref.digest])
            if member is None or holdings.has(member, ref.digest):
                start(ref)  # the owner has it (fetched from the peers), or is gone (the ordinary way)
            else:
                waiting.append(ref)
        if len(waiting) < len(pending):
            last_new = time.monotonic()
        elif waiting and time.monotonic() - last_new >= split.owner_wait_s:
            for ref in waiting:
                start(ref)
            fallbacks = len(waiting)
            waiting = []
        pending = waiting
        progress.waiting = len(pending)
        if pending:
            await asyncio.sleep(POLL_S)
    return fallbacks
