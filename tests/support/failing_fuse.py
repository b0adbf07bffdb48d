"""A LayerFS served alone on a real FUSE mount, with a failure injected into one handler.

Run as `python -m tests.support.failing_fuse MOUNTPOINT OP`: mounts one small layer (directory
`d`, file `d/f` with an xattr, symlink `l`) and makes the internals called from handler OP raise
RuntimeError (OP = none injects nothing). Prints `ready` once mounted; serves until killed.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any, cast

import pyfuse3
import pyfuse3.asyncio

from converter.format import toc as fmt
from peer.fetcher import ChunkFetcher
from peerpull.config import LogConfig
from peerpull.logs import configure_logging
from snapshotter.fs.file_reader import FileReader
from snapshotter.fs.fusefs import LayerFS

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

        def _top_attr(self) -> pyfuse3.EntryAttributes:
            if _caller() == op:
                raise RuntimeError(f"injected into {op}")
            return top_attr(self)

    fs = FailingFS(FileReader(cast(ChunkFetcher, None), 16 << 20, "none", 1))
    fs.add_layer(LAYER, 1, "example/repo", layer_toc())
    fs._by_name = _FailingLayers(op, fs._by_name)
    return fs


async def _serve(mountpoint: str, op: str) -> None:
    pyfuse3.init(failing_fs(op), mountpoint, {"fsname=peerpull-test", "ro", "default_permissions"})
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    main = asyncio.ensure_future(pyfuse3.main())
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await main
    except asyncio.CancelledError:
        pass
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    configure_logging(LogConfig(level="info", format="json"))  # logs on stderr: stdout says `ready`
    pyfuse3.asyncio.enable()
    asyncio.run(_serve(sys.argv[1], sys.argv[2]))
