"""A LayerFS served alone on a real FUSE mount, with a failure injected into one handler.

Run as `python -m tests.support.failing_fuse MOUNTPOINT OP [BACKEND]`: mounts one small layer
(directory `d`, file `d/f` with an xattr, symlink `l`) over BACKEND (pyfuse3, the default, or
kernel) and makes the internals called from handler OP raise RuntimeError (OP = none injects
nothing). Prints `ready` once mounted; serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any, cast

from converter.format import toc as fmt
from peer.fetcher import ChunkFetcher
from peerpull.config import LogConfig
from peerpull.logs import configure_logging
from snapshotter.fs.file_reader import FileReader
from snapshotter.fs.fusefs import Attr, LayerFS
from snapshotter.fs.mount import open_mount

LAYER = "sha256:" + "ab" * 32
LAYER_DIR = LAYER.split(":", 1)[1]


def layer_toc() -> fmt.Toc:
    chunk = fmt.Chunk(0, 5, 0, 14, b"\0" * 32)
    return fmt.Toc(1 << 20, [
        fmt.TocEntry(path=".", type=fmt.DIR, mode=0o755),
        fmt.TocEntry(path="d", type=fmt.DIR, mode=0o755),
        fmt.TocEntry(path="d/f", type=fmt.FILE, mode=0o644, size=5, chunks=[chunk], xattrs={"user.k": b"v"}),
        fmt.TocEntry(path="l", type=fmt.SYMLINK, mode=0o777, link="d/f"),
    ])


def _caller() -> str:
    return sys._getframe(2).f_code.co_name  # the handler that called the patched internal


class _FailingLayers(dict[bytes, Any]):
    def __init__(self, op: str, items: dict[bytes, Any]) -> None:
        super().__init__(items)
        self._op = op

    def values(self) -> Any:
        if _caller() == self._op:
            raise RuntimeError(f"injected into {self._op}")
        return super().values()


def failing_fs(op: str) -> LayerFS:
    node, top_attr = LayerFS._node, LayerFS._top_attr

    class FailingFS(LayerFS):
        def _node(self, ino: int) -> Any:
            if _caller() == op:
                raise RuntimeError(f"injected into {op}")
            return node(self, ino)

        def _top_attr(self) -> Attr:
            if _caller() == op:
                raise RuntimeError(f"injected into {op}")
            return top_attr(self)

    fs = FailingFS(FileReader(cast(ChunkFetcher, None), 16 << 20, "none", 1))
    fs.add_layer(LAYER, 1, "example/repo", layer_toc())
    fs._by_name = _FailingLayers(op, fs._by_name)
    return fs


async def _serve(mountpoint: str, op: str, backend: str) -> None:
    mount = open_mount(failing_fs(op), Path(mountpoint), backend, 64, 128)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    serving = asyncio.ensure_future(mount.serve())
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(mount.stop(serving)))
    try:
        await serving
    except asyncio.CancelledError:
        pass
    finally:
        mount.close()


if __name__ == "__main__":
    configure_logging(LogConfig(level="info", format="json"))  # logs on stderr: stdout says `ready`
    asyncio.run(_serve(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "pyfuse3"))
