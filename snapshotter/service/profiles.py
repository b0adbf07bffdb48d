"""Startup profiles: which chunks an image's containers read first, in order.

A profile is a hint for fetching ahead: nothing in it is trusted. Decoding checks its shape and
bounds (a bad one is a `FormatError`); `restrict` then drops the entries that name no frame of a
layer this node serves, so a stale or foreign profile costs bandwidth at worst, never correctness.

On disk, on the peer route and in the registry a profile is the same JSON document
(`PROFILE_MEDIA_TYPE`):

    {"version": 1, "manifest_digest": "sha256:…", "layers": ["sha256:…", …],
     "reads": [[layer index, frame blob offset], …]}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from converter.format import untrusted
from converter.format.digest import is_digest
from converter.format.errors import FormatError

PROFILE_MEDIA_TYPE = "application/vnd.peerpull.startup-profile.v1+json"
PROFILE_VERSION = 1
MAX_PROFILE_BYTES = 4 << 20  # a profile of every chunk of an 8 GB image is ~1 MiB
MAX_PROFILE_READS = 200_000
MAX_PROFILE_LAYERS = 512


@dataclass(frozen=True)
class StartupProfile:
    manifest_digest: str
    reads: tuple[tuple[str, int], ...]  # (layer blob digest, frame blob_offset), first-read order

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers the profile reads from, in order of their first read."""
        return tuple(dict.fromkeys(blob for blob, _ in self.reads))


class ProfileSource(Protocol):
    async def find(self, image_ref: str, manifest_digest: str) -> StartupProfile | None: ...


def encode(profile: StartupProfile) -> bytes:
    layers = list(profile.layers)
    index = {blob: i for i, blob in enumerate(layers)}
    doc = {"version": PROFILE_VERSION, "manifest_digest": profile.manifest_digest, "layers": layers,
           "reads": [[index[blob], offset] for blob, offset in profile.reads]}
    return json.dumps(doc, separators=(",", ":")).encode()


def _is_offset(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 50


def decode(data: bytes, manifest_digest: str | None = None) -> StartupProfile:
    """A profile from its JSON; FormatError when it is malformed, oversized, or for another image."""
    if len(data) > MAX_PROFILE_BYTES:
        raise FormatError(f"startup profile of {len(data)} bytes is above the {MAX_PROFILE_BYTES >> 20} MiB limit")
    try:
        doc = untrusted.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FormatError("startup profile is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != PROFILE_VERSION:
        raise FormatError(f"startup profile is not a version {PROFILE_VERSION} profile object")
    digest, layers, reads = doc.get("manifest_digest"), doc.get("layers"), doc.get("reads")
    if not is_digest(digest):
        raise FormatError("startup profile names no well-formed manifest digest")
    if manifest_digest is not None and digest != manifest_digest:
        raise FormatError(f"startup profile is for manifest {digest}, not {manifest_digest}")
    if not isinstance(layers, list) or len(layers) > MAX_PROFILE_LAYERS or not all(is_digest(b) for b in layers):
        raise FormatError(f"startup profile 'layers' is not a list of at most {MAX_PROFILE_LAYERS} digests")
    if not isinstance(reads, list) or len(reads) > MAX_PROFILE_READS:
        raise FormatError(f"startup profile 'reads' is not a list of at most {MAX_PROFILE_READS} entries")
    out: list[tuple[str, int]] = []
    for item in reads:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                and 0 <= item[0] < len(layers) and _is_offset(item[1])):
            raise FormatError("startup profile 'reads' holds an entry that is not [layer index, offset]")
        out.append((layers[item[0]], item[1]))
    return StartupProfile(str(digest), tuple(dict.fromkeys(out)))


def restrict(profile: StartupProfile, frames: Callable[[str], Collection[int] | None],
             layers: Collection[str] | None = None) -> StartupProfile:
    """The profile without its stale entries: those of a layer not in `layers` (the image's, when
    known) and those at an offset that is no frame of the layer (`frames(blob)`: the layer's frame
    blob offsets, None when this node has not read that layer's TOC yet and cannot tell)."""
    known: dict[str, Collection[int] | None] = {}
    kept = []
    for blob, offset in profile.reads:
        if layers is not None and blob not in layers:
            continue
        if blob not in known:
            known[blob] = frames(blob)
        layer = known[blob]
        if layer is None or offset in layer:
            kept.append((blob, offset))
    return StartupProfile(profile.manifest_digest, tuple(kept))


BETTER_BY = 1.1  # a new profile replaces a stored one with at least 10% more chunks


def share_of_layers(profile: StartupProfile, layers: Collection[str],
                    frames: Callable[[str], dict[int, int] | None]) -> float:
    """The part of the image's compressed bytes (its `layers`, and any other the profile reads)
    that `profile` reads, 0..1; `frames(blob)` gives a mounted layer's frames as {blob offset:
    compressed length} (None: not mounted, not counted).

    A start that reads most of the image is a whole-image workload (a scan, a copy, a checksum):
    kept as a profile, it would make every node fetch everything before it starts, and background
    streaming serves such a workload better."""
    offsets: dict[str, set[int]] = {}
    for blob, offset in profile.reads:
        offsets.setdefault(blob, set()).add(offset)
    total = read = 0
    for blob in dict.fromkeys([*layers, *profile.layers]):
        layer = frames(blob)
        if not layer:
            continue
        total += sum(layer.values())
        read += sum(layer.get(offset, 0) for offset in offsets.get(blob, ()))
    return read / total if total else 0.0


def better(new: StartupProfile, old: StartupProfile | None) -> bool:
    """Whether `new` should replace `old`: it saw clearly more of the start-up (10% more chunks).

    A later start that reads less (its files already in the page cache, or a shorter run) does not
    shrink the profile, and nodes that each record about the same do not push one after another;
    an image change has another manifest digest and so another profile."""
    return bool(new.reads) and (old is None or len(new.reads) >= len(old.reads) * BETTER_BY)
