"""The containerd APIs `peerpull pull` drives (content, images, snapshots, diff, leases), over
containerd's gRPC socket, in one namespace, under one lease while an image is being prepared."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

import peerpull_proto as proto
from converter.format.digest import is_digest, sha256_digest
from converter.format.errors import (
    AlreadyExistsError,
    ConfigError,
    ContainerdError,
    FailedPreconditionError,
    NotFoundError,
    PeerpullError,
)

_types = proto.load("containerd.types.descriptor_pb2")
_snap = proto.load("containerd.services.snapshots.v1.snapshots_pb2")
_snap_grpc = proto.load("containerd.services.snapshots.v1.snapshots_pb2_grpc")
_content = proto.load("containerd.services.content.v1.content_pb2")
_content_grpc = proto.load("containerd.services.content.v1.content_pb2_grpc")
_images = proto.load("containerd.services.images.v1.images_pb2")
_images_grpc = proto.load("containerd.services.images.v1.images_pb2_grpc")
_diff = proto.load("containerd.services.diff.v1.diff_pb2")
_diff_grpc = proto.load("containerd.services.diff.v1.diff_pb2_grpc")
_leases = proto.load("containerd.services.leases.v1.leases_pb2")
_leases_grpc = proto.load("containerd.services.leases.v1.leases_pb2_grpc")

WRITE_BLOCK = 1 << 20


def _translate(exc: grpc.aio.AioRpcError, what: str) -> PeerpullError:
    detail = f"{what}: {exc.details()}"
    code = exc.code()
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return AlreadyExistsError(detail)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(detail)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPreconditionError(detail)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ConfigError(f"{what}: containerd is not reachable ({exc.details()})")
    return ContainerdError(detail)


def descriptor(media_type: str, digest: str, size: int) -> Any:
    return _types.Descriptor(media_type=media_type, digest=digest, size=size)


class ContainerdClient:
    """`async with ContainerdClient("/run/containerd/containerd.sock", "default") as c:`."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._channel: grpc.aio.Channel | None = None
        self.lease: str | None = None

    async def __aenter__(self) -> ContainerdClient:
        target = self.address if "://" in self.address else f"unix://{self.address}"
        self._channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 16 << 20)])
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._channel is not None:
            await self._channel.close()

    def _md(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease:
            md.append(("containerd-lease", self.lease))
        return md

    async def _call(self, what: str, method: Any, request: Any, timeout: float = 120) -> Any:
        try:
            return await method(request, metadata=self._md(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, what) from None

    @property
    def channel(self) -> grpc.aio.Channel:
        assert self._channel is not None, "use `async with`"
        return self._channel

    # ---- leases -------------------------------------------------------------------------------

    async def create_lease(self, expire_s: int = 3600) -> str:
        """A lease that protects what we create from GC until it is deleted (or expires)."""
        stub = _leases_grpc.LeasesStub(self.channel)
        lease_id = f"peerpull-pull-{uuid.uuid4().hex[:12]}"
        await self._call("create lease", stub.Create, _leases.CreateRequest(
            id=lease_id, labels={"containerd.io/gc.expire": _expiry(expire_s)}))
        self.lease = lease_id
        return lease_id

    async def delete_lease(self) -> None:
        if self.lease:
            lease, self.lease = self.lease, None
            await self._call("delete lease", _leases_grpc.LeasesStub(self.channel).Delete, _leases.DeleteRequest(id=lease))

    # ---- content ------------------------------------------------------------------------------

    async def content_exists(self, digest: str) -> bool:
        try:
            await self._call("content info", _content_grpc.ContentStub(self.channel).Info, _content.InfoRequest(digest=digest))
            return True
        except NotFoundError:
            return False

    async def read_content(self, digest: str, max_bytes: int) -> bytes | None:
        """A small blob (manifest, config) from containerd's content store, checked against its
        digest; None when containerd does not have it (or holds more than max_bytes under it)."""
        stub = _content_grpc.ContentStub(self.channel)
        try:
            info = await self._call("content info", stub.Info, _content.InfoRequest(digest=digest))
        except NotFoundError:
            return None
        if info.info.size > max_bytes:
            return None
        parts: list[bytes] = []
        try:
            async for piece in stub.Read(_content.ReadContentRequest(digest=digest), metadata=self._md(), timeout=120):
                parts.append(piece.data)
        except grpc.aio.AioRpcError as exc:
            err = _translate(exc, f"read {digest} from containerd")
            if isinstance(err, NotFoundError):
                return None  # collected between Info and Read
            raise err from None
        data = b"".join(parts)
        return data if is_digest(digest) and sha256_digest(data) == digest else None

    async def set_content_labels(self, digest: str, labels: dict[str, str]) -> None:
        info = _content.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        await self._call("content update", _content_grpc.ContentStub(self.channel).Update,
                         _content.UpdateRequest(info=info, update_mask=mask))

    async def write_content(self, digest: str, size: int, blocks: AsyncIterator[bytes], labels: dict[str, str]) -> None:
        """Stream a blob into containerd's content store; containerd checks size and digest on commit."""
        stub = _content_grpc.ContentStub(self.channel)
        ref = f"peerpull-{digest.split(':', 1)[1][:16]}-{uuid.uuid4().hex[:8]}"
        call = stub.Write(metadata=self._md(), timeout=3600)
        offset = 0
        try:
            async for block in blocks:
                for start in range(0, len(block), WRITE_BLOCK):
                    piece = block[start:start + WRITE_BLOCK]
                    await call.write(_content.WriteContentRequest(action=1, ref=ref, total=size, expected=digest,
                                                                  offset=offset, data=piece))
                    await call.read()
                    offset += len(piece)
            await call.write(_content.WriteContentRequest(action=2, ref=ref, total=size, expected=digest,
                                                          offset=offset, labels=labels))
            await call.read()
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            err = _translate(exc, f"write {digest} to containerd")
            if isinstance(err, AlreadyExistsError):
                return
            raise err from None

    async def write_bytes(self, digest: str, data: bytes, labels: dict[str, str]) -> None:
        async def one() -> AsyncIterator[bytes]:
            yield data

        await self.write_content(digest, len(data), one(), labels)

    # ---- snapshots (through containerd, so its metadata knows them) ---------------------------

    async def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        try:
            await self._call("stat snapshot", _snap_grpc.SnapshotsStub(self.channel).Stat,
                             _snap.StatSnapshotRequest(snapshotter=snapshotter, key=key))
            return True
        except NotFoundError:
            return False

    async def prepare(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> list[Any]:
        resp = await self._call("prepare snapshot", _snap_grpc.SnapshotsStub(self.channel).Prepare,
                                _snap.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent,
                                                             labels=labels), timeout=600)
        return list(resp.mounts)

    async def commit(self, snapshotter: str, name: str, key: str) -> None:
        await self._call("commit snapshot", _snap_grpc.SnapshotsStub(self.channel).Commit,
                         _snap.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key))

    async def remove(self, snapshotter: str, key: str) -> None:
        await self._call("remove snapshot", _snap_grpc.SnapshotsStub(self.channel).Remove,
                         _snap.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))

    async def apply(self, desc: Any, mounts: list[Any]) -> str:
        """Unpack a layer that is in the content store into `mounts`; returns its diff id."""
        resp = await self._call("apply layer", _diff_grpc.DiffStub(self.channel).Apply,
                                _diff.ApplyRequest(diff=desc, mounts=mounts), timeout=3600)
        return str(resp.applied.digest)

    # ---- images -------------------------------------------------------------------------------

    async def image_exists(self, name: str) -> bool:
        try:
            await self._call("get image", _images_grpc.ImagesStub(self.channel).Get, _images.GetImageRequest(name=name))
            return True
        except NotFoundError:
            return False

    async def put_image(self, name: str, target: Any, labels: dict[str, str]) -> None:
        stub = _images_grpc.ImagesStub(self.channel)
        image = _images.Image(name=name, target=target, labels=labels)
        try:
            await self._call("create image", stub.Create, _images.CreateImageRequest(image=image))
        except AlreadyExistsError:
            mask = field_mask_pb2.FieldMask(paths=["target", *[f"labels.{k}" for k in labels]])
            await self._call("update image", stub.Update, _images.UpdateImageRequest(image=image, update_mask=mask))


def _expiry(seconds: int) -> str:
    import datetime

    return (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
