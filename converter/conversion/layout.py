"""Startup-first layout: reorder a layer's tar so the files a container reads first come first.

The layer writer packs consecutive small files into shared frames, so putting a startup profile's
files next to each other at the front makes the working set one contiguous run of frames that a
node fetches in a few large ranges. The reordered tar must still unpack, on any containerd, to
exactly the tree the original gives; so only what is safe to move moves:

* a startup file moves only when it is a regular file whose path occurs once in the layer, no
  whiteout of the layer names it or one of its ancestors, nothing in the layer lies below it, and
  each ancestor the layer lists is listed once, as a directory;
* its ancestors' directory entries move with it (ahead of it, in their original order), so every
  directory still precedes what it contains; hardlinks stay after their targets (a target only
  moves earlier); whiteouts, opaque markers, duplicates and everything else keep their relative
  order;
* a layer with a PAX global header moves nothing (the header changes how every later member reads).

Small startup files (below the packing threshold) go first in profile order, then the larger ones:
a large file ends the current shared frame, so interleaving them would cost extra frames.
The reordered bytes are a different tar, so the layer's diff_id changes (the config is rewritten).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from converter.conversion.layer_writer import toc_entry_for
from converter.conversion.tarstream import TarWalker
from converter.format import toc as fmt

_READ = 1 << 20


@dataclass(frozen=True)
class _Member:
    start: int  # spool offset of the first header block
    end: int  # spool offset after the content's padding
    path: str  # normalized tar path (a whiteout's own name, not its target)
    type: str  # the TOC type (whiteouts mapped)
    target: str  # what a whiteout removes; the path otherwise
    size: int


@dataclass(frozen=True)
class LayoutPlan:
    segments: list[tuple[int, int]]  # spool byte ranges in the new order, the trailer last
    moved: list[str] = field(default_factory=list)  # startup files moved to the front, in their new order
    moved_bytes: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # startup path → why it stays where it was


def _ancestors(path: str) -> list[str]:
    """The directories holding `path`, outermost first, the root (".") included."""
    out = []
    while (path := posixpath.dirname(path)) not in ("", "."):
        out.append(path)
    return [".", *out[::-1]]


def _scan(spool: BinaryIO) -> tuple[list[_Member], int, bool]:
    """The spooled tar's members, where its trailer starts, and whether it has a PAX global header."""
    walker = TarWalker(spool)
    members: list[_Member] = []
    end = 0
    while (member := walker.next_member()) is not None:
        entry = toc_entry_for(member)
        left = member.size
        while left:
            left -= len(walker.read_data(min(left, _READ)))
        walker.padding()
        raw = fmt.normalize_path(member.name)
        members.append(_Member(member.offset, walker.offset, raw, entry.type, entry.path, member.size))
        end = walker.offset
    return members, end, walker.saw_global_pax


def _why_not(path: str, members: dict[str, list[_Member]], removed: set[str], below: set[str]) -> str | None:
    found = members.get(path)
    if not found:
        return "not in this layer"
    if len(found) > 1:
        return "the layer lists this path more than once"
    if found[0].type != fmt.FILE or found[0].target != path:
        return f"a {found[0].type}, not a regular file"
    if path in below:
        return "the layer lists entries below it"
    for p in (*_ancestors(path)[1:], path):
        if p in removed:
            return f"a whiteout of this layer removes {p}"
    for a in _ancestors(path):
        listed = members.get(a, [])
        if len(listed) > 1 or (listed and listed[0].type != fmt.DIR):
            return f"its ancestor {a} is not listed once as a directory"
    return None


def plan_layout(spool: BinaryIO, startup: Sequence[str], small: int) -> LayoutPlan:
    """The new member order of the tar in `spool` with the startup files (TOC paths, first-read
    order) first; `small`: the writer's packing threshold (0: no packing, keep profile order)."""
    members, trailer, global_pax = _scan(spool)
    spool.seek(0, 2)
    tail = (trailer, spool.tell())
    everything = [(m.start, m.end) for m in members]
    if global_pax:
        return LayoutPlan([*everything, tail], refused=dict.fromkeys(startup, "the layer has a PAX global header"))
    by_path: dict[str, list[_Member]] = {}
    below: set[str] = set()
    for m in members:
        by_path.setdefault(m.path, []).append(m)
        below.update(_ancestors(m.path))
    removed = {m.target for m in members if m.type == fmt.WHITEOUT}
    refused: dict[str, str] = {}
    chosen: list[_Member] = []
    for path in dict.fromkeys(startup):
        why = _why_not(path, by_path, removed, below)
        if why is None:
            chosen.append(by_path[path][0])
        else:
            refused[path] = why
    if not chosen:
        return LayoutPlan([*everything, tail], refused=refused)
    files = ([m for m in chosen if 0 < m.size < small] + [m for m in chosen if not 0 < m.size < small]
             if small else chosen)
    dirs = {a for m in files for a in _ancestors(m.path)}
    head_dirs = [m for m in members if m.path in dirs and m.type == fmt.DIR]
    moved = {m.start for m in head_dirs} | {m.start for m in files}
    order = [*head_dirs, *files, *(m for m in members if m.start not in moved)]
    return LayoutPlan([(m.start, m.end) for m in order] + [tail], [m.path for m in files],
                      sum(m.size for m in files), refused)


class SegmentReader:
    """A read-only stream of byte ranges of a seekable file, one after another."""

    def __init__(self, src: BinaryIO, segments: Sequence[tuple[int, int]]) -> None:
        self._src = src
        self._segments = [(s, e) for s, e in segments if e > s]
        self._index = 0
        self._pos = self._segments[0][0] if self._segments else 0

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        want = n if n >= 0 else 1 << 62
        while want and self._index < len(self._segments):
            start, end = self._segments[self._index]
            take = min(want, end - self._pos)
            self._src.seek(self._pos)
            data = self._src.read(take)
            if len(data) != take:
                raise OSError(f"spooled layer shrank at offset {self._pos}")
            parts.append(data)
            want -= take
            self._pos += take
            if self._pos >= end:
                self._index += 1
                if self._index < len(self._segments):
                    self._pos = self._segments[self._index][0]
        return b"".join(parts)
