"""A tiny real FUSE mount served by peerpull's own kernel session, for tests: the test layer of
failing_fuse.py (directory `d`, file `d/f` with an xattr, symlink `l`) with scripted reads.

    async with mounted(Scripted(), tmp_path / "mnt") as mount:
        session = mount.session  # fd, init_state(), open_backing() ...

Syscalls on the mount must leave the event loop that serves it: `await in_thread(os.stat, path)`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

from peer.fetcher import ChunkFetcher
from snapshotter.fs.file_reader import FileReader
from snapshotter.fs.fusefs import LayerFS
from snapshotter.fs.mount import KernelMount, mounted_at
from snapshotter.fs.passthrough import Backing
from tests.support.failing_fuse import LAYER, layer_toc

BOUND_S = 60.0  # a guard against a hang, not a timing assertion


class Scripted(LayerFS):
    """The test layer with scripted reads: "hello", or with `stall` a fetch that never answers
    until `gate` is set (or INTERRUPT cancels it); and optionally a complete local copy of its
    file (`backing`: what the object store will provide) for passthrough."""

    def __init__(self, stall: bool = False) -> None:
        super().__init__(FileReader(cast(ChunkFetcher, None), 16 << 20, "none", 1))
        self.add_layer(LAYER, 1, "example/repo", layer_toc())
        self.stall = stall
        self.gate = asyncio.Event()  # a stalled read goes on once it is set
        self.backing: Path | None = None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.stall:
            await self.gate.wait()
        return b"hello"[off:off + size]

    def backing_file(self, inode: int) -> Backing | None:
        return Backing("", self.backing) if self.backing is not None else None


@contextlib.asynccontextmanager
async def mounted(fs: LayerFS, point: Path) -> AsyncIterator[KernelMount]:
    point.mkdir()
    mount = KernelMount(fs, point, 64, 128)
    mount.open()
    serving = asyncio.create_task(mount.serve())
    try:
        yield mount
    finally:
        await mount.stop(serving)
        mount.close()
        assert mounted_at(point) is None


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(int(BOUND_S / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition did not come true")


async def in_thread(call: Any, *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(call, *args), BOUND_S)
