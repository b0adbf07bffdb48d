"""The gRPC seam: every RPC of the snapshots service maps errors through one table, over a real
gRPC server on a unix socket; the store's blocking work runs off the event loop; the error
taxonomy is one rooted tree whose exit codes live in the CLI."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing

import proto
from converter.format import errors
from converter.format import toc as fmt
from converter.format.layer_reader import read_toc_frame
from peer.singleflight import SingleFlight
from peerpull import exit_codes
from peerpull.cli import build_parser
from snapshotter.service import grpc_service
from snapshotter.service.grpc_errors import STATUS, status_of
from snapshotter.service.grpc_service import SnapshotService, serve
from snapshotter.service.mounts import Layout
from snapshotter.service.remote import LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_TARGET, RemoteLayers
from snapshotter.service.store import SnapshotStore

pb = proto.load("containerd.services.snapshots.v1.snapshots_pb2")
pb_grpc = proto.load("containerd.services.snapshots.v1.snapshots_pb2_grpc")

RPCS = ("Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage", "Cleanup")


class FaultyStore(SnapshotStore):
    """A real store that raises `fault` from its next call, and records the threads it runs on."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fault: BaseException | None = None
        self.threads: list[tuple[str, threading.Thread]] = []

    def _enter(self, name: str) -> None:
        self.threads.append((name, threading.current_thread()))
        if self.fault is not None:
            fault, self.fault = self.fault, None
            raise fault

    def find(self, key: str) -> Any:
        self._enter("find")
        return super().find(key)

    def all(self) -> Any:
        self._enter("all")
        return super().all()

    def create(self, *args: Any, **kwargs: Any) -> Any:
        self._enter("create")
        return super().create(*args, **kwargs)

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        self._enter("commit")
        return super().commit(*args, **kwargs)

    def remove(self, key: str) -> Any:
        self._enter("remove")
        return super().remove(key)

    def set_labels(self, key: str, labels: dict[str, str]) -> Any:
        self._enter("set_labels")
        return super().set_labels(key, labels)


class Service:
    def __init__(self, store: FaultyStore, stub: Any) -> None:
        self.store = store
        self.stub = stub


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    store = FaultyStore(tmp_path / "meta.db")
    server = await serve(SnapshotService(store, Layout(tmp_path / "root"), None), tmp_path / "snap.sock")
    channel = grpc.aio.insecure_channel(f"unix://{tmp_path / 'snap.sock'}")
    try:
        yield Service(store, pb_grpc.SnapshotsStub(channel))
    finally:
        await channel.close()
        await server.stop(None)
        store.close()


async def _call(stub: Any, rpc: str) -> Any:
    """One call of `rpc` on snapshot "a" (which exists and is active)."""
    requests = {
        "Prepare": pb.PrepareSnapshotRequest(key="b"), "View": pb.ViewSnapshotRequest(key="v"),
        "Mounts": pb.MountsRequest(key="a"), "Commit": pb.CommitSnapshotRequest(name="c", key="a"),
        "Remove": pb.RemoveSnapshotRequest(key="a"), "Stat": pb.StatSnapshotRequest(key="a"),
        "Update": pb.UpdateSnapshotRequest(info=pb.Info(name="a", labels={"x": "1"})),
        "List": pb.ListSnapshotsRequest(), "Usage": pb.UsageRequest(key="a"), "Cleanup": pb.CleanupRequest(),
    }
    if rpc == "List":
        return [r async for r in stub.List(requests["List"])]
    return await getattr(stub, rpc)(requests[rpc])


async def _status(stub: Any, rpc: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _call(stub, rpc)
    return raised.value.code()


def test_every_rpc_of_the_service_goes_through_the_one_seam() -> None:
    servicer_rpcs = {n for n in vars(pb_grpc.SnapshotsServicer) if not n.startswith("_")}
    assert servicer_rpcs == set(RPCS)
    for name in RPCS:
        assert getattr(getattr(SnapshotService, name), "mapped_errors", False), name


@pytest.mark.parametrize("fault, code", [
    (errors.NotFoundError("gone"), grpc.StatusCode.NOT_FOUND),
    (errors.RegistryNotFoundError("blob gone"), grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError("twice"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.ConfigError("bad filter"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FormatError("bad bytes"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPreconditionError("has children"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RegistryUnreachableError("refused"), grpc.StatusCode.UNAVAILABLE),
    (errors.ContainerdError("containerd down"), grpc.StatusCode.UNAVAILABLE),
    (errors.UnsupportedError("no such feature"), grpc.StatusCode.UNIMPLEMENTED),
    (NotImplementedError("later"), grpc.StatusCode.UNIMPLEMENTED),
    (errors.PeerpullError("plain failure"), grpc.StatusCode.INTERNAL),
    (OSError(28, "No space left on device"), grpc.StatusCode.INTERNAL),
    (ZeroDivisionError("a bug"), grpc.StatusCode.INTERNAL),
])
async def test_every_rpc_maps_an_injected_failure_by_the_one_table(service: Service, fault: BaseException,
                                                                     code: grpc.StatusCode) -> None:
    service.store.create("a", "", grpc_service.ACTIVE, {})
    for rpc in RPCS:
        service.store.fault = fault
        assert await _status(service.stub, rpc) == code, rpc
        assert service.store.fault is None, f"{rpc} never reached the store"


async def test_unexpected_errors_are_internal_and_logged_once(service: Service) -> None:
    with structlog.testing.capture_logs() as logs:
        service.store.fault = ZeroDivisionError("a bug")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await service.stub.Stat(pb.StatSnapshotRequest(key="a"))
    assert raised.value.code() == grpc.StatusCode.INTERNAL and "ZeroDivisionError" in raised.value.details()
    failed = [e for e in logs if e["event"] == "snapshot_rpc_failed"]
    assert len(failed) == 1 and failed[0]["method"] == "Stat" and failed[0]["error_type"] == "ZeroDivisionError"


async def test_real_errors_keep_their_codes_through_grpc(service: Service) -> None:
    assert await _status(service.stub, "Stat") == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [r async for r in service.stub.List(pb.ListSnapshotsRequest(filters=["bogus~=x"]))]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await service.stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await service.stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await service.stub.Commit(pb.CommitSnapshotRequest(name="base", key="a"))
    await service.stub.Prepare(pb.PrepareSnapshotRequest(key="child", parent="base"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await service.stub.Remove(pb.RemoveSnapshotRequest(key="base"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_store_work_runs_off_the_event_loop_thread(service: Service) -> None:
    loop_thread = threading.current_thread()
    await service.stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"x": "1"}))
    await service.stub.Commit(pb.CommitSnapshotRequest(name="base", key="a"))
    await service.stub.View(pb.ViewSnapshotRequest(key="v", parent="base"))
    await service.stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="base", labels={"y": "2"})))
    [r async for r in service.stub.List(pb.ListSnapshotsRequest())]
    await service.stub.Remove(pb.RemoveSnapshotRequest(key="v"))
    await service.stub.Cleanup(pb.CleanupRequest())
    called = {name for name, _ in service.store.threads}
    assert {"create", "commit", "set_labels", "all", "remove"} <= called
    threads = {thread for _, thread in service.store.threads}
    assert loop_thread not in threads
    assert len(threads) == 1, "one store thread keeps SQLite access serialized"


class _Blob:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    async def read_range(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


async def test_a_blob_without_a_footer_is_told_apart_by_type() -> None:
    with pytest.raises(errors.NoFooterError):
        await read_toc_frame(_Blob(b"an ordinary gzip layer, no footer" * 10))
    with pytest.raises(errors.NoFooterError):
        await read_toc_frame(_Blob(b"tiny"))
    with pytest.raises(errors.NoFooterError):
        fmt.decode_footer(b"\0" * fmt.FOOTER_SIZE, 10_000)
    assert issubclass(errors.NoFooterError, errors.FormatError)
    assert issubclass(errors.NotSeekableError, errors.UnsupportedError)


async def test_remote_layers_say_not_seekable_by_type(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "meta.db")
    try:
        remote = RemoteLayers(tmp_path, store, None, None, "none")  # type: ignore[arg-type]
        with pytest.raises(errors.NotSeekableError):
            await remote.resolve({LABEL_TARGET: "t"})
        with pytest.raises(errors.FormatError):
            await remote.resolve({LABEL_TARGET: "t", LABEL_LAYER_DIGEST: "sha256:../x", LABEL_IMAGE_REF: "r/i:1"})
    finally:
        store.close()


def test_one_rooted_tree_with_not_found_outside_the_registry() -> None:
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, Exception):
            assert issubclass(cls, errors.PeerpullError), name
            assert "exit_code" not in vars(cls), f"{name}: exit codes belong to the CLI (peerpull/exit_codes.py)"
    assert not issubclass(errors.NotFoundError, errors.RegistryError)  # snapshot keys are no registry's
    registry_404 = errors.RegistryNotFoundError("blob")
    assert isinstance(registry_404, errors.NotFoundError) and isinstance(registry_404, errors.RegistryError)
    assert status_of(registry_404) == grpc.StatusCode.NOT_FOUND
    assert set(STATUS.values()) >= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED}


def test_exit_codes_stay_the_same_and_the_help_says_them() -> None:
    expected = {errors.PeerpullError: 1, errors.ConfigError: 2, errors.FormatError: 3, errors.DigestMismatchError: 3,
                errors.NoFooterError: 3, errors.RegistryError: 4, errors.RegistryUnreachableError: 5,
                errors.AuthError: 6, errors.NotFoundError: 7, errors.RegistryNotFoundError: 7,
                errors.UnsupportedError: 8, errors.NotSeekableError: 8, errors.AlreadyExistsError: 9,
                errors.FailedPreconditionError: 10, errors.ContainerdError: 11}
    assert {cls: exit_codes.exit_code(cls) for cls in expected} == expected
    assert exit_codes.exit_code(errors.RegistryNotFoundError("x")) == 7
    epilog = build_parser().epilog or ""
    for code in {*expected.values(), 0, 70, 130}:
        assert f" {code} " in epilog, code


async def test_a_look_ahead_is_shared_with_the_call_that_follows() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started = 0
    release = asyncio.Event()

    async def fetch() -> int:
        nonlocal started
        started += 1
        await release.wait()
        return 42

    future = flight.start("k", fetch)
    assert flight.inflight("k") and flight.start("k", fetch) is future
    waiter = asyncio.ensure_future(flight.do("k", fetch))
    await asyncio.sleep(0)
    release.set()
    assert await waiter == 42 and started == 1 and not flight.inflight("k")

    async def broken() -> int:
        raise errors.RegistryUnreachableError("down")

    flight.start("bad", broken)  # nobody awaits: no "exception never retrieved", the next call starts afresh
    while flight.inflight("bad"):
        await asyncio.sleep(0)
    assert await flight.do("bad", fetch) == 42
