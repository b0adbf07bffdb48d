"""Layer trees built in the background, after the layer's Prepare has already answered.

A layer whose TOC digest the manifest vouches for is committed as soon as its TOC is on disk
(`snapshotter.defer_tree_build`): parsing the TOC and building the tree (the most CPU of a pull)
then overlap with the other layers' TOC fetches and containerd's own work. Nothing can read the
layer before a snapshot on top of it is prepared, viewed or mounted: those wait here (`wait`),
and a build that failed fails them with one line (LayerBuildError) instead of a half-mounted tree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

from converter.format.errors import FailedPreconditionError
from peer.tasks import TaskSet


class LayerBuildError(FailedPreconditionError):
    """A lazily served layer's tree could not be built: snapshots on top of it cannot be mounted."""


class TreeBuilds:
    def __init__(self) -> None:
        self._builds: dict[str, asyncio.Task[Any]] = {}  # by layer digest, until it succeeded (or is forgotten)
        self._tasks = TaskSet("tree_builds")

    def start(self, digest: str, build: Coroutine[Any, Any, Any]) -> None:
        """Run `build` for the layer in the background (its failure is kept for `wait`)."""
        task = self._tasks.spawn(build, f"tree-build {digest}", quiet=True)
        if task is None:
            return  # shutting down
        self._builds[digest] = task
        task.add_done_callback(lambda t: self._done(digest, t))

    def _done(self, digest: str, task: asyncio.Task[Any]) -> None:
        if self._builds.get(digest) is task and not task.cancelled() and task.exception() is None:
            del self._builds[digest]  # built: nothing to wait for any more

    def running(self, digest: str) -> bool:
        task = self._builds.get(digest)
        return task is not None and not task.done()

    def failed(self, digest: str) -> bool:
        task = self._builds.get(digest)
        return task is not None and task.done()

    async def wait(self, digests: Iterable[str]) -> None:
        """Until every named layer's build has ended; LayerBuildError (one line) if one failed."""
        for digest in digests:
            task = self._builds.get(digest)
            if task is None:
                continue
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # the waiter was cancelled, not the build
                raise LayerBuildError(f"layer {digest}: its tree build was cancelled (layer released?)") from None
            except Exception as exc:
                raise LayerBuildError(f"layer {digest}: its file tree could not be built from its TOC: "
                                      f"{str(exc) or type(exc).__name__}") from None

    def forget(self, digest: str) -> None:
        """The layer is gone (released) or about to be fetched again: drop its build, cancel a running one."""
        task = self._builds.pop(digest, None)
        if task is not None and not task.done():
            task.cancel()

    async def close(self) -> None:
        await self._tasks.close()
