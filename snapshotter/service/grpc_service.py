"""containerd.services.snapshots.v1.Snapshots, served to containerd as a proxy snapshotter.

Ordinary snapshots behave as with containerd's overlayfs snapshotter. A Prepare that names a
target (`containerd.io/snapshot.ref`) for a seekable layer commits that target itself, backed
by the layer's directory in the FUSE mount, and answers ALREADY_EXISTS, so containerd skips the
download; any failure there falls back to an ordinary snapshot (logged, counted, never silent).
Such a layer's tree may still be building (snapshotter.defer_tree_build): Prepare, View and Mounts
of snapshots on top of it wait for it, and fail with one line if it could not be built.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import empty_pb2, timestamp_pb2

import peerpull_proto as proto
from converter.format.errors import AlreadyExistsError, ConfigError, NotSeekableError
from snapshotter.service import filters
from snapshotter.service.grpc_errors import rpc
from snapshotter.service.mounts import Layout, MountSpec, mounts_for
from snapshotter.service.remote import (
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_REMOTE,
    LABEL_TARGET,
    RemoteLayers,
)
from snapshotter.service.store import ACTIVE, COMMITTED, VIEW, Snapshot, SnapshotStore

log = structlog.get_logger(__name__)
pb = proto.load("containerd.services.snapshots.v1.snapshots_pb2")
pb_grpc = proto.load("containerd.services.snapshots.v1.snapshots_pb2_grpc")
mount_pb = proto.load("containerd.types.mount_pb2")
# a container of an image starts: (image ref, manifest digest, its lazily served layers)
ContainerStarted = Callable[[str, str, list[str]], object]

def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def info_message(snap: Snapshot) -> Any:
    return pb.Info(name=snap.key, parent=snap.parent, kind=snap.kind, created_at=_timestamp(snap.created),
                   updated_at=_timestamp(snap.updated), labels=snap.labels)


def _mount_messages(specs: list[MountSpec]) -> list[Any]:
    return [mount_pb.Mount(type=m.type, source=m.source, options=m.options) for m in specs]


def _usage(path: Path) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes under `path`, hardlinks counted once."""
    size, inodes, seen = 0, 0, set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            size += st.st_blocks * 512
    return size, inodes


class SnapshotService(pb_grpc.SnapshotsServicer):  # type: ignore[misc,name-defined]
    def __init__(self, store: SnapshotStore, layout: Layout, remote: RemoteLayers | None,
                 on_fallback: Callable[[str], None] | None = None, on_container: ContainerStarted | None = None) -> None:
        self._store = store
        self._on_container = on_container
        self._layout = layout
        self._remote = remote
        self._on_fallback = on_fallback or (lambda reason: None)
        layout.snapshots.mkdir(parents=True, exist_ok=True)

    # ---- creating -----------------------------------------------------------------------------

    def _create_steps(self, kind: int, key: str, parent: str, labels: dict[str, str]) -> list[MountSpec]:
        snap = self._store.create(key, parent, kind, labels)
        try:
            self._layout.upper(snap).mkdir(parents=True)
            self._layout.work(snap).mkdir()
        except OSError:
            self._store.remove(key)
            raise
        return mounts_for(self._layout, snap, self._store.chain(snap))

    def _mounts_of(self, key: str) -> list[MountSpec]:
        snap = self._store.get(key)
        return mounts_for(self._layout, snap, self._store.chain(snap))

    def _chain_layers(self, key: str) -> list[str]:
        """The lazily served layers of snapshot `key` and its ancestors ([] if it does not exist)."""
        snap = self._store.find(key)
        if snap is None:
            return []
        return [s.layer for s in [snap, *self._store.chain(snap)] if s.layer]

    async def _layers_ready(self, key: str) -> None:
        """Until the trees of the lazily served layers under `key` (itself included) are built."""
        if self._remote is None or not key:
            return
        layers = await self._store.run(self._chain_layers, key)
        if layers:
            await self._remote.ready(layers)

    async def _create(self, kind: int, key: str, parent: str, labels: dict[str, str]) -> list[Any]:
        await self._layers_ready(parent)
        specs = await self._store.run(self._create_steps, kind, key, parent, labels)
        log.debug("snapshot_created", key=key, parent=parent, kind=kind)
        return _mount_messages(specs)

    async def _try_remote(self, key: str, parent: str, labels: dict[str, str]) -> bool:
        """Commit the target as a lazily served layer; False when it has to be an ordinary snapshot."""
        target = labels.get(LABEL_TARGET, "")
        if not target or self._remote is None:
            return False
        existing = await self._store.run(self._store.find, target)
        if existing is not None and existing.kind == COMMITTED and existing.parent == parent:
            return True
        # the same layer on another parent (another namespace's ordinary snapshot): its own name
        name = target if existing is None else f"{target}@{hashlib.sha256(parent.encode()).hexdigest()[:16]}"
        again = await self._store.run(self._store.find, name)
        if again is not None and again.kind == COMMITTED and again.parent == parent:
            return True
        try:
            record = await self._remote.resolve(labels)
        except NotSeekableError as exc:
            log.debug("layer_not_lazy", target=target, reason=str(exc))
            return False
        except Exception as exc:  # whatever failed, the layer still arrives the ordinary way
            log.warning("lazy_layer_fallback", target=target, key=key, layer=labels.get(LABEL_LAYER_DIGEST, ""),
                        error=str(exc) or type(exc).__name__, hint="containerd downloads this layer instead")
            self._on_fallback(type(exc).__name__)
            return False
        committed = {**labels, LABEL_REMOTE: record.digest}
        try:
            await self._store.run(self._store.create, name, parent, COMMITTED, committed, record.digest)
        except AlreadyExistsError:
            pass
        log.info("snapshot_lazy", target=target, parent=parent, layer=record.digest)
        return True

    @rpc
    async def Prepare(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        labels = dict(request.labels)
        if await self._try_remote(request.key, request.parent, labels):
            raise AlreadyExistsError(f"target snapshot {labels[LABEL_TARGET]!r} is served lazily")
        mounts = await self._create(ACTIVE, request.key, request.parent, labels)
        if self._on_container is not None and request.parent and LABEL_TARGET not in labels:
            await self._container_started(request.key, request.parent)
        return pb.PrepareSnapshotResponse(mounts=mounts)

    def _lazy_image(self, parent: str) -> tuple[str, str, list[str]] | None:
        """The image (ref, manifest digest) and lazily served layers under `parent`, if it has any."""
        top = self._store.get(parent)
        chain = [top, *self._store.chain(top)]
        layers = [s.layer for s in chain if s.layer]
        image = next((s.labels for s in chain if s.layer and s.labels.get(LABEL_IMAGE_REF)
                      and s.labels.get(LABEL_MANIFEST_DIGEST)), None)
        if not layers or image is None:
            return None
        return image[LABEL_IMAGE_REF], image[LABEL_MANIFEST_DIGEST], layers

    async def _container_started(self, key: str, parent: str) -> None:
        """An active snapshot that is no layer being unpacked (no target label): a container's
        root file system. Its image's startup gets recorded; nothing here may fail the Prepare."""
        assert self._on_container is not None
        try:
            image = await self._store.run(self._lazy_image, parent)
            if image is not None:
                self._on_container(*image)
        except Exception as exc:  # a profile is a hint: the container starts whatever happens here
            log.warning("profile_start_failed", key=key, error=f"{type(exc).__name__}: {exc}")

    @rpc
    async def View(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ViewSnapshotResponse(mounts=await self._create(VIEW, request.key, request.parent, dict(request.labels)))

    @rpc
    async def Mounts(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._layers_ready(request.key)
        return pb.MountsResponse(mounts=_mount_messages(await self._store.run(self._mounts_of, request.key)))

    @rpc
    async def Commit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        active = await self._store.run(self._store.get, request.key)
        size, inodes = await asyncio.to_thread(_usage, self._layout.upper(active))
        await self._store.run(self._store.commit, request.name, request.key, dict(request.labels), size, inodes)
        log.debug("snapshot_committed", key=request.key, name=request.name, bytes=size)
        return empty_pb2.Empty()

    # ---- removing -----------------------------------------------------------------------------

    @rpc
    async def Remove(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        snap = await self._store.run(self._store.remove, request.key)
        if snap.layer and self._remote is not None:
            await self._remote.release(snap.layer)
        await asyncio.to_thread(shutil.rmtree, self._layout.snapshots / str(snap.id), True)
        log.debug("snapshot_removed", key=request.key)
        return empty_pb2.Empty()

    @rpc
    async def Cleanup(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._store.run(self.remove_orphans)  # its own thread: the store reads stay serialized
        return empty_pb2.Empty()

    def remove_orphans(self) -> int:
        """Delete snapshot directories no snapshot owns (left by a crash between steps)."""
        known = {str(s.id) for s in self._store.all()}
        removed = 0
        for entry in self._layout.snapshots.iterdir():
            if entry.name not in known:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        if removed:
            log.info("orphan_snapshot_dirs_removed", count=removed)
        return removed

    # ---- reading ------------------------------------------------------------------------------

    @rpc
    async def Stat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.StatSnapshotResponse(info=info_message(await self._store.run(self._store.get, request.key)))

    @rpc
    async def Update(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        snap = await self._store.run(self._store.get, request.info.name)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        labels = dict(snap.labels)
        if not paths:
            labels = dict(request.info.labels)
        for path in paths:
            if path == "labels":
                labels = dict(request.info.labels)
            elif path.startswith("labels."):
                key = path[len("labels."):]
                if key in request.info.labels:
                    labels[key] = request.info.labels[key]
                else:
                    labels.pop(key, None)
            else:
                raise ConfigError(f"cannot update field {path!r} of a snapshot (only labels)")
        return pb.UpdateSnapshotResponse(info=info_message(await self._store.run(self._store.set_labels, snap.key, labels)))

    @rpc
    async def List(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        compiled = filters.compile_filters(list(request.filters))  # ConfigError: INVALID_ARGUMENT
        batch = []
        for snap in await self._store.run(self._store.all):
            if filters.matches(snap, compiled):
                batch.append(info_message(snap))
            if len(batch) >= 100:
                yield pb.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield pb.ListSnapshotsResponse(info=batch)

    @rpc
    async def Usage(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        snap = await self._store.run(self._store.get, request.key)
        if snap.kind == ACTIVE:
            size, inodes = await asyncio.to_thread(_usage, self._layout.upper(snap))
        else:
            size, inodes = snap.size, snap.inodes
        return pb.UsageResponse(size=size, inodes=inodes)


async def serve(service: SnapshotService, socket_path: Path) -> grpc.aio.Server:
    """Start the gRPC server on a unix socket (replacing a stale socket file)."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
    pb_grpc.add_SnapshotsServicer_to_server(service, server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    os.chmod(socket_path, 0o600)
    return server
