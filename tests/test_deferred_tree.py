"""A layer committed before its tree is built (snapshotter.defer_tree_build, snapshotter/service/
tree_builds.py), over the real gRPC service and a real registry: the layer's Prepare answers
ALREADY_EXISTS first; Prepare, View and Mounts of snapshots on top wait for the build and then
see the whole tree; a build that fails fails them with one line (FAILED_PRECONDITION)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

import proto
from converter.format.errors import FormatError
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from snapshotter.config import SnapshotterConfig
from snapshotter.service import layer_build
from snapshotter.service.grpc_service import SnapshotService, serve
from snapshotter.service.mounts import Layout
from snapshotter.service.remote import (
    LABEL_IMAGE_LAYERS,
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_TARGET,
)
from tests.test_image_fetch import Pull, image  # noqa: F401 — the converted 2-layer image fixture

pb = proto.load("containerd.services.snapshots.v1.snapshots_pb2")
pb_grpc = proto.load("containerd.services.snapshots.v1.snapshots_pb2_grpc")


class Node:
    def __init__(self, pull: Pull, stub: Any, manifest: str, layers: list[str], image_ref: str) -> None:
        self.pull, self.stub, self.manifest, self.layers, self.image_ref = pull, stub, manifest, layers, image_ref

    async def pull_layers(self) -> str:
        """What `peerpull pull` asks per layer; returns the top chain (every Prepare answers ALREADY_EXISTS)."""
        parent = ""
        for i, digest in enumerate(self.layers):
            labels = {LABEL_TARGET: f"chain{i}", LABEL_LAYER_DIGEST: digest, LABEL_IMAGE_REF: self.image_ref,
                      LABEL_MANIFEST_DIGEST: self.manifest, LABEL_IMAGE_LAYERS: ",".join(self.layers[i:])}
            with pytest.raises(grpc.aio.AioRpcError) as answered:
                await self.stub.Prepare(pb.PrepareSnapshotRequest(key=f"extract-{i}", parent=parent, labels=labels))
            assert answered.value.code() == grpc.StatusCode.ALREADY_EXISTS
            parent = f"chain{i}"
        return parent


@pytest.fixture
async def node(registry_session, image: str, tmp_path: Path) -> AsyncIterator[Node]:  # noqa: F811
    async with RegistryClient(RegistryConfig()) as client:
        fetched, _ = await client.resolve_image(ImageReference.parse(image))
        layers = [d["digest"] for d in json.loads(fetched.body)["layers"]]
        pull = Pull(tmp_path, client, SnapshotterConfig(stream="never"))
        server = await serve(SnapshotService(pull.store, Layout(tmp_path / "root"), pull.remote), tmp_path / "snap.sock")
        channel = grpc.aio.insecure_channel(f"unix://{tmp_path / 'snap.sock'}")
        try:
            yield Node(pull, pb_grpc.SnapshotsStub(channel), fetched.digest, layers, image)
        finally:
            await channel.close()
            await server.stop(None)
            await pull.close()


def _held_builds(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> threading.Event:
    """Every tree build blocks (in its worker thread) until the returned event is set, then builds or fails."""
    release = threading.Event()
    real: Callable[..., Any] = layer_build.build_layer

    def build(*args: Any) -> Any:
        release.wait(60)
        if fail:
            raise FormatError("injected: no tree for this layer")
        return real(*args)

    monkeypatch.setattr(layer_build, "build_layer", build)
    return release


async def test_a_child_prepare_waits_for_the_deferred_trees_and_then_sees_them_whole(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    release = _held_builds(monkeypatch)
    top = await node.pull_layers()  # answered while no tree is built yet
    assert all(node.pull.fs.source(d) is None for d in node.layers)
    preparing = asyncio.ensure_future(node.stub.Prepare(pb.PrepareSnapshotRequest(key="container", parent=top)))
    viewing = asyncio.ensure_future(node.stub.View(pb.ViewSnapshotRequest(key="view", parent=top)))
    await asyncio.sleep(0.3)
    assert not preparing.done() and not viewing.done()
    release.set()
    response = await preparing
    await viewing
    assert response.mounts[0].type == "overlay"
    for digest in node.layers:  # every layer's tree is mounted whole by the time the mounts are answered
        source = node.pull.fs.source(digest)
        assert source is not None
        toc = node.pull.remote._load_toc(node.pull.store.layer(digest))  # type: ignore[arg-type]
        layer = node.pull.fs._by_name[digest.split(":")[1].encode()]
        assert layer.tree.bytes == sum(e.size for e in toc.entries if e.type == "file") > 0
    mounts = await node.stub.Mounts(pb.MountsRequest(key="container"))
    assert list(mounts.mounts) == list(response.mounts)


async def test_a_failed_deferred_build_fails_prepare_view_and_mounts_on_top_with_one_line(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    release = _held_builds(monkeypatch, fail=True)
    top = await node.pull_layers()
    release.set()
    calls = [node.stub.Prepare(pb.PrepareSnapshotRequest(key="container", parent=top)),
             node.stub.View(pb.ViewSnapshotRequest(key="view", parent=top)),
             node.stub.Mounts(pb.MountsRequest(key=top))]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        detail = failed.value.details() or ""
        assert "\n" not in detail and "injected: no tree for this layer" in detail
        assert any(digest in detail for digest in node.layers)
    assert node.pull.store.find("container") is None and node.pull.store.find("view") is None
