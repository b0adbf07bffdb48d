"""A layer's TOC frame parsed, and turned into its mounted tree (CPU work, for worker threads), with Python's cyclic garbage collector paused meanwhile.

Parsing a TOC and building its tree allocate a few objects per entry, tens of thousands per layer,
none of them garbage; the collector would run dozens of times meanwhile and each full pass walks
every live object of the daemon (the trees of all layers already mounted). Pausing it for the
duration roughly halves the time a Prepare waits (bench/pull_measure.py). Builds may run in
several threads at once: the collector is off while any runs and back on when the last ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from converter.format import toc as fmt
from snapshotter.fs.fusefs import LayerFS, MountedLayer

_lock = threading.Lock()
_active = 0
_was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic GC inside (reference counting still frees everything); nests across threads."""
    global _active, _was_enabled
    with _lock:
        if _active == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _was_enabled:
                gc.enable()


def parse_toc(frame: bytes, footer: fmt.Footer) -> fmt.Toc:
    """The parsed TOC, validated (FormatError if it is not well formed)."""
    with collector_paused():
        return fmt.decode_toc(frame, footer)


def build_layer(digest: str, slot: int, repository: str, toc: fmt.Toc) -> MountedLayer:
    """The layer's tree and chunk index."""
    with collector_paused():
        return LayerFS.build_layer(digest, slot, repository, toc)
