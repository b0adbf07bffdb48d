"""What a pull brings in (snapshotter/service/image_fetch.py), through the real resolve path of
RemoteLayers against a real registry: the profile's frames exactly, the rest by rule, stopped on
release and at shutdown."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from peer.chunk import ChunkRef
from peer.config import PeerConfig
from peerpull.config import load_config
from snapshotter.config import SnapshotterConfig
from snapshotter.fs.file_reader import FileReader
from snapshotter.fs.fusefs import LayerFS
from snapshotter.service.image_fetch import ImageFetch
from snapshotter.service.remote import (
    LABEL_IMAGE_LAYERS,
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_TARGET,
    RemoteLayers,
)
from snapshotter.service.store import SnapshotStore
from tests.support.fault_proxy import FaultProxy
from tests.support.peer_cluster import build_cluster_image
from tests.support.waiting import async_wait_until
from tests.test_convert import peerpull
from tests.test_stream import CHUNK, Node, blob_ranges


@pytest.fixture(scope="module")
def image(registry_session, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("image-fetch") / "layout"
    build_cluster_image(layout, big_bytes=2 << 20, small_files=40)
    target = f"{registry_session.address}/imagefetch/app:1"
    # format 1: one frame per small file, so the profiles below can pick frames that are not neighbours
    peerpull("convert", "--quiet", "--format-version", "1", "--chunk-size", str(CHUNK), f"oci:{layout}:latest", target)
    return target


@dataclass(frozen=True)
class Profile:  # the shape of profiles.StartupProfile
    manifest_digest: str
    reads: tuple[tuple[str, int], ...]


class FakeProfiles:
    """A ProfileSource with one profile (C builds the real ones; here only the contract matters)."""

    def __init__(self, profile: Profile | None) -> None:
        self.profile = profile
        self.asked: list[tuple[str, str]] = []

    async def find(self, image_ref: str, manifest_digest: str) -> Profile | None:
        self.asked.append((image_ref, manifest_digest))
        return self.profile


class Pull:
    """A node's snapshotter side without containerd: RemoteLayers.resolve as Prepare calls it."""

    def __init__(self, tmp_path: Path, client: RegistryClient, config: SnapshotterConfig,
                 profiles: FakeProfiles | None = None, peer: PeerConfig | None = None, defer_build: bool = True) -> None:
        self.node = Node(client, tmp_path, peer or PeerConfig(coalesce_max_bytes=512 << 10))
        self.reader = FileReader(self.node.fetcher, 64 << 20, "none", 8)
        self.fs = LayerFS(self.reader)
        self.store = SnapshotStore(tmp_path / "meta.db")
        self.fetch = ImageFetch(self.node.streamer, config, profiles)
        self.reader.add_observer(self.fetch.observe)
        self.remote = RemoteLayers(tmp_path, self.store, self.fs, client, "none", image_fetch=self.fetch,
                                   defer_build=defer_build)

    async def prepare(self, image: str, client: RegistryClient) -> tuple[str, list[str]]:
        fetched, _ = await client.resolve_image(ImageReference.parse(image))
        layers = [d["digest"] for d in json.loads(fetched.body)["layers"]]
        await self.remote.resolve({LABEL_TARGET: "chain", LABEL_LAYER_DIGEST: layers[0], LABEL_IMAGE_REF: image,
                                   LABEL_MANIFEST_DIGEST: fetched.digest, LABEL_IMAGE_LAYERS: ",".join(layers)})
        return fetched.digest, layers

    def task(self, manifest: str) -> asyncio.Task[None]:
        task = self.fetch._images[manifest].task
        assert task is not None
        return task

    async def close(self) -> None:
        await self.fetch.close()
        await self.remote.close()
        await self.reader.close()
        await self.node.close()
        self.store.close()


def refs_of(pull: Pull, layers: list[str]) -> list[ChunkRef]:
    out = []
    for blob in layers:
        source = pull.fs.source(blob)
        assert source is not None
        out += [source.ref(c) for c in source.chunks]
    return out


async def test_a_profile_puts_exactly_its_frames_in_the_cache_at_pull_time(registry_session, image: str,
                                                                          tmp_path: Path) -> None:
    proxy = await FaultProxy(registry_session.url).start()
    proxied = image.replace(registry_session.address, proxy.address)
    async with RegistryClient(RegistryConfig()) as client:
        fetched, _ = await client.resolve_image(ImageReference.parse(proxied))
        layers = [d["digest"] for d in json.loads(fetched.body)["layers"]]
        profiles = FakeProfiles(None)
        pull = Pull(tmp_path, client, SnapshotterConfig(stream="never"), profiles)
        try:
            # resolve the layers once to learn their frames, then pick a profile across both layers
            manifest, _ = await pull.prepare(proxied, client)
            await pull.task(manifest)  # no profile, stream = never: done once the layers are mounted
            everything = refs_of(pull, layers)
            small, big = [r for r in everything if r.blob == layers[1]], [r for r in everything if r.blob == layers[0]]
            chosen = [small[3], big[5], small[4], small[5], big[6], small[20]]
            profile = Profile(fetched.digest, tuple((r.blob, r.blob_offset) for r in chosen) + ((layers[0], 7),))
            await pull.close()

            pull = Pull(tmp_path / "again", client, SnapshotterConfig(stream="never"), FakeProfiles(profile))
            for layer in layers:  # a new node's TOC reads, before counting the profile's requests
                await pull.remote._resolve(layer, proxied, fetched.digest)
            before = len(proxy.requests)
            manifest, _ = await pull.prepare(proxied, client)
            await pull.task(manifest)  # the profile is in before any read
            await pull.node.fetcher.flush()
            cached = {r.digest for r in everything if await pull.node.cache.contains(r.digest)}
            assert cached == {r.digest for r in chosen}  # exactly the profile; the stale entry skipped
            # small[3..5] and big[5..6] are runs: one Range request each, small[20] its own
            data_ranges = [r for r in blob_ranges(proxy, before)
                           if any(r[1] <= c.blob_offset < r[2] for c in chosen if c.blob == r[0])]
            assert len(data_ranges) == 3 == pull.node.origin.requests
        finally:
            await pull.close()
            await proxy.stop()


async def test_auto_streams_the_rest_only_once_reads_pass_the_threshold(image: str, tmp_path: Path) -> None:
    async with RegistryClient(RegistryConfig()) as client:
        config = SnapshotterConfig(stream="auto", stream_after_bytes=256 << 10)
        profiles = FakeProfiles(None)
        pull = Pull(tmp_path, client, config, profiles)
        try:
            manifest, layers = await pull.prepare(image, client)
            # no profile: once asked, the fetch waits for the threshold
            await async_wait_until(lambda: bool(profiles.asked), 30, "the profile lookup")
            assert pull.node.origin.requests == 0 and not pull.task(manifest).done()
            # a container reads the small files of the code layer, one after another
            tree = pull.fs._by_name[layers[1].split(":")[1].encode()].tree
            files = [n for n in tree.inodes.values() if n.chunks]
            source = pull.fs.source(layers[1])
            assert source is not None
            for node in files:
                await pull.reader.read(source, node.ino, node.chunks, node.size, 0, node.size)
                if pull.task(manifest).done():
                    break
            await asyncio.wait_for(pull.task(manifest), 60)
            assert pull.fetch._images[manifest].beyond.is_set()
            assert pull.node.origin.bytes > 0
            await pull.node.fetcher.flush()
            assert all([await pull.node.cache.contains(r.digest) for r in refs_of(pull, layers)])
        finally:
            await pull.close()


@pytest.mark.parametrize("stop", ["release", "shutdown"])
async def test_a_stream_stops_when_its_layers_are_released_and_at_shutdown(registry_session, image: str,
                                                                          tmp_path: Path, stop: str) -> None:
    proxy = await FaultProxy(registry_session.url).start()
    proxied = image.replace(registry_session.address, proxy.address)
    async with RegistryClient(RegistryConfig(read_timeout_s=60)) as client:
        pull = Pull(tmp_path, client, SnapshotterConfig(stream="always"))
        try:
            fetched, _ = await client.resolve_image(ImageReference.parse(proxied))
            for d in json.loads(fetched.body)["layers"]:  # TOC reads pass; the stream's first run is held
                await pull.remote._resolve(d["digest"], proxied, fetched.digest)
            proxy.hold("/blobs/", times=1)
            manifest, layers = await pull.prepare(proxied, client)
            await async_wait_until(lambda: proxy.held == 1, 30, "the stream's first request")
            task = pull.task(manifest)
            if stop == "release":
                await pull.remote.release(layers[0])
            else:
                await pull.fetch.close()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
            assert task.cancelled()
            assert pull.node.streamer.bytes_in_flight == 0
        finally:
            await pull.close()
            await proxy.stop()


def test_defaults_and_validation(tmp_path: Path) -> None:
    config = load_config(None, environ={})
    assert config.snapshotter.stream == "auto" and config.snapshotter.stream_after_bytes == 64 << 20
    assert config.snapshotter.prefetch == "sequential" and config.snapshotter.prefetch_sequential_bytes == 4 << 20
    assert config.snapshotter.profile_fetch is True
    assert config.peer.stream_parallel == 4 and config.peer.stream_max_bytes_in_flight == 32 << 20
    assert load_config(None, environ={"PEERPULL_SNAPSHOTTER_STREAM": "never"}).snapshotter.stream == "never"
    bad = tmp_path / "bad.toml"
    bad.write_text('[snapshotter]\nstream = "sometimes"\n')
    with pytest.raises(Exception, match="snapshotter.stream must be one of"):
        load_config(str(bad), environ={})
    assert replace(config.snapshotter, prefetch="file").prefetch == "file"  # the old modes still load
