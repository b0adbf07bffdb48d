"""How a node reads a layer's TOC (snapshotter/service/remote.py) against a real registry: once
per layer, footer included, in one Range request; a restarted node reads it from its disk; a TOC
that matches its annotated digest but does not parse leaves nothing behind (the Prepare falls back),
or, with the tree built after the commit, fails whatever mounts on top of it with one line; a
corrupt TOC on disk is fetched again at restart; the layers of one pull share one manifest GET."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
import zstandard

from converter.format import toc as fmt
from converter.format.digest import sha256_digest
from converter.format.errors import FormatError
from converter.registry import media_types as mt
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from snapshotter.config import SnapshotterConfig
from snapshotter.service.remote import (
    LABEL_IMAGE_LAYERS,
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_TARGET,
)
from snapshotter.service.store import COMMITTED
from snapshotter.service.tree_builds import LayerBuildError
from tests.support.fault_proxy import FaultProxy
from tests.test_image_fetch import Pull, image  # noqa: F401 — the converted 2-layer image fixture
from tests.test_stream import blob_ranges


async def test_a_layers_toc_comes_once_in_one_range_and_a_restart_reads_it_from_disk(
        registry_session, image: str, tmp_path: Path) -> None:  # noqa: F811
    proxy = await FaultProxy(registry_session.url).start()
    proxied = image.replace(registry_session.address, proxy.address)
    async with RegistryClient(RegistryConfig()) as client:
        fetched, _ = await client.resolve_image(ImageReference.parse(image))
        layers = json.loads(fetched.body)["layers"]
        pull = Pull(tmp_path, client, SnapshotterConfig(stream="never"))
        try:
            before = len(proxy.requests)
            await pull.prepare(proxied, client)
            for desc in layers:  # the layers above the first resolve in the background: wait for them
                assert await pull.remote._source_of(proxied, fetched.digest, desc["digest"]) is not None
            blobs = [r for r in proxy.requests[before:] if "/blobs/" in r[1]]
            assert not [r for r in blobs if r[0] == "HEAD"]
            expected = sorted((d["digest"], int(d["annotations"][fmt.ANNOTATION_TOC_OFFSET]), d["size"]) for d in layers)
            assert sorted(blob_ranges(proxy, before)) == expected
            # asked again (another image with these layers, a second Prepare): nothing is sent
            count = len(proxy.requests)
            for desc in layers:
                await pull.remote._resolve(desc["digest"], proxied, fetched.digest)
            assert len(proxy.requests) == count
        finally:
            await pull.close()

        restarted = Pull(tmp_path, client, SnapshotterConfig(stream="never"))
        try:
            count = len(proxy.requests)
            assert restarted.remote.restore() == len(layers)
            assert all(restarted.fs.source(d["digest"]) is not None for d in layers)
            assert len(proxy.requests) == count
        finally:
            await restarted.close()
            await proxy.stop()


def _bad_toc_layer() -> tuple[bytes, fmt.Footer, bytes]:
    """A layer blob whose TOC frame is well formed zstd + msgpack but no valid TOC (entries is a string)."""
    data = zstandard.ZstdCompressor(write_checksum=True).compress(b"x" * 1000)
    packed = msgpack.packb({"version": fmt.FORMAT_VERSION, "chunk_size": 1 << 20, "frames": [], "entries": "oops"})
    body = zstandard.ZstdCompressor().compress(packed)
    frame = fmt.SKIPPABLE_HEADER.pack(fmt.TOC_FRAME_MAGIC, len(body)) + body
    footer = fmt.Footer(len(data), len(frame), len(packed))
    return data + frame + fmt.encode_footer(footer), footer, frame


async def test_a_toc_that_matches_its_digest_but_does_not_parse_leaves_nothing_behind(registry_session,
                                                                                      tmp_path: Path) -> None:
    blob, footer, frame = _bad_toc_layer()
    ref = ImageReference.parse(f"{registry_session.address}/badtoc/app:1")
    async with RegistryClient(RegistryConfig()) as client:
        layer = await client.push_blob_bytes(ref, blob)
        config = await client.push_blob_bytes(ref, b'{"rootfs": {"type": "layers", "diff_ids": []}}')
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": config, "size": 46},
            "layers": [{"mediaType": mt.OCI_LAYER_ZSTD, "digest": layer, "size": len(blob), "annotations": {
                fmt.ANNOTATION_TOC_DIGEST: sha256_digest(frame), fmt.ANNOTATION_TOC_OFFSET: str(footer.toc_offset),
                fmt.ANNOTATION_TOC_LENGTH: str(footer.toc_length)}}]}).encode()
        await client.push_manifest(ref, manifest, mt.OCI_MANIFEST)
        pull = Pull(tmp_path, client, SnapshotterConfig(stream="never"), defer_build=False)
        try:
            with pytest.raises(FormatError):
                await pull.remote.resolve({LABEL_TARGET: "chain", LABEL_LAYER_DIGEST: layer, LABEL_IMAGE_REF: str(ref),
                                           LABEL_MANIFEST_DIGEST: sha256_digest(manifest)})
            assert pull.store.layer(layer) is None
            assert list((tmp_path / "layers").iterdir()) == []
            assert pull.fs.source(layer) is None
        finally:
            await pull.close()


async def _push_bad_toc_image(client: RegistryClient, address: str) -> tuple[str, ImageReference, str]:
    """(layer digest, image, manifest digest) of a 1-layer image whose vouched-for TOC does not parse."""
    blob, footer, frame = _bad_toc_layer()
    ref = ImageReference.parse(f"{address}/badtoc/deferred:1")
    layer = await client.push_blob_bytes(ref, blob)
    config = await client.push_blob_bytes(ref, b'{"rootfs": {"type": "layers", "diff_ids": []}}')
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": config, "size": 46},
        "layers": [{"mediaType": mt.OCI_LAYER_ZSTD, "digest": layer, "size": len(blob), "annotations": {
            fmt.ANNOTATION_TOC_DIGEST: sha256_digest(frame), fmt.ANNOTATION_TOC_OFFSET: str(footer.toc_offset),
            fmt.ANNOTATION_TOC_LENGTH: str(footer.toc_length)}}]}).encode()
    await client.push_manifest(ref, manifest, mt.OCI_MANIFEST)
    return layer, ref, sha256_digest(manifest)


async def test_a_deferred_build_that_fails_is_one_error_for_what_waits_and_the_toc_is_fetched_again(
        registry_session, tmp_path: Path) -> None:
    async with RegistryClient(RegistryConfig()) as client:
        layer, ref, manifest = await _push_bad_toc_image(client, registry_session.address)
        pull = Pull(tmp_path, client, SnapshotterConfig(stream="never"))  # defer_tree_build: the default
        labels = {LABEL_TARGET: "chain", LABEL_LAYER_DIGEST: layer, LABEL_IMAGE_REF: str(ref), LABEL_MANIFEST_DIGEST: manifest}
        try:
            record = await pull.remote.resolve(labels)  # committed before its tree is built
            assert record.digest == layer
            with pytest.raises(LayerBuildError) as failed:
                await pull.remote.ready([layer])
            assert "\n" not in str(failed.value) and "entries has the wrong type" in str(failed.value)
            assert pull.fs.source(layer) is None
            assert not (tmp_path / "layers" / (layer.split(":")[1] + ".toc")).exists()
            # the next resolve does not take the failed build for a mounted layer: it fetches and fails again
            await pull.remote.resolve(labels)
            with pytest.raises(LayerBuildError):
                await pull.remote.ready([layer])
        finally:
            await pull.close()


async def test_the_layers_of_one_pull_share_one_manifest_get(registry_session, image: str,  # noqa: F811
                                                             tmp_path: Path) -> None:
    proxy = await FaultProxy(registry_session.url).start()
    proxied = image.replace(registry_session.address, proxy.address)
    async with RegistryClient(RegistryConfig()) as client:
        fetched, _ = await client.resolve_image(ImageReference.parse(image))
        layers = [d["digest"] for d in json.loads(fetched.body)["layers"]]
        assert len(layers) > 1
        pull = Pull(tmp_path, client, SnapshotterConfig(stream="never"))
        try:
            await pull.remote.resolve({LABEL_TARGET: "chain", LABEL_LAYER_DIGEST: layers[0], LABEL_IMAGE_REF: proxied,
                                       LABEL_MANIFEST_DIGEST: fetched.digest, LABEL_IMAGE_LAYERS: ",".join(layers)})
            for digest in layers:  # the look-aheads and each layer's own Prepare
                await pull.remote.resolve({LABEL_TARGET: f"chain-{digest}", LABEL_LAYER_DIGEST: digest,
                                           LABEL_IMAGE_REF: proxied, LABEL_MANIFEST_DIGEST: fetched.digest})
                assert await pull.remote._source_of(proxied, fetched.digest, digest) is not None
            manifests = [r for r in proxy.requests if r[0] == "GET" and "/manifests/" in r[1]]
            assert len(manifests) == 1
        finally:
            await pull.close()
            await proxy.stop()


async def test_a_corrupt_toc_on_disk_is_fetched_again_at_restart(registry_session, image: str,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    proxy = await FaultProxy(registry_session.url).start()
    proxied = image.replace(registry_session.address, proxy.address)
    async with RegistryClient(RegistryConfig()) as client:
        fetched, _ = await client.resolve_image(ImageReference.parse(image))
        layers = [d["digest"] for d in json.loads(fetched.body)["layers"]]
        pull = Pull(tmp_path, client, SnapshotterConfig(stream="never"))
        try:
            for i, digest in enumerate(layers):  # each layer committed as a snapshot, as Prepare does
                labels = {LABEL_LAYER_DIGEST: digest, LABEL_IMAGE_REF: proxied, LABEL_MANIFEST_DIGEST: fetched.digest}
                record = await pull.remote.resolve({LABEL_TARGET: f"chain{i}", **labels})
                pull.store.create(f"chain{i}", f"chain{i - 1}" if i else "", COMMITTED, labels, record.digest)
            await pull.remote.ready(layers)
        finally:
            await pull.close()
        bad = layers[-1]
        toc_file = tmp_path / "layers" / (bad.split(":")[1] + ".toc")
        data = toc_file.read_bytes()
        toc_file.write_bytes(data[:fmt.FOOTER_SIZE] + b"\0" * (len(data) - fmt.FOOTER_SIZE))  # a disk's garbage

        restarted = Pull(tmp_path, client, SnapshotterConfig(stream="never"))
        try:
            before = len(proxy.requests)
            assert restarted.remote.restore() == len(layers) - 1
            await restarted.remote.ready(layers)  # what a Prepare on top of it waits for
            assert all(restarted.fs.source(d) is not None for d in layers)
            assert [b for b, _, _ in blob_ranges(proxy, before)] == [bad]
            assert toc_file.read_bytes() == data
        finally:
            await restarted.close()
            await proxy.stop()
