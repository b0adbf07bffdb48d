"""The OCI registry client against a real Distribution registry (faults injected by a proxy)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from converter.format.digest import sha256_digest
from converter.format.errors import DigestMismatchError, NotFoundError, RegistryUnreachableError, UnsupportedError
from converter.registry import media_types as mt
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from tests.support.fault_proxy import FaultProxy

FAST = RegistryConfig(retries=3, backoff_base_s=0.01, upload_chunk_bytes=256 * 1024)
BLOB = random.Random(7).randbytes(3 * 1024 * 1024 + 11)
DIGEST = sha256_digest(BLOB)


def ref(address: str, repo: str = "test/repo", tag: str = "t") -> ImageReference:
    return ImageReference.parse(f"{address}/{repo}:{tag}")


@pytest.fixture
async def proxy(registry):
    p = await FaultProxy(registry.url).start()
    yield p
    await p.stop()


async def test_chunked_push_then_streamed_and_ranged_reads(registry, tmp_path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(BLOB)
    r = ref(registry.address)
    async with RegistryClient(FAST) as client:
        assert await client.blob_size(r, DIGEST) is None
        assert await client.push_blob_file(r, DIGEST, path, len(BLOB)) is True
        assert await client.push_blob_file(r, DIGEST, path, len(BLOB)) is False  # already there
        assert await client.blob_size(r, DIGEST) == len(BLOB)
        streamed = b"".join([b async for b in client.stream_blob(r, DIGEST, chunk_bytes=65536)])
        assert streamed == BLOB
        assert await client.read_range(r, DIGEST, 1_000_000, 4096) == BLOB[1_000_000:1_004_096]
        assert await client.read_range(r, DIGEST, len(BLOB) - 5, 5) == BLOB[-5:]


async def test_a_range_is_cut_into_its_pieces_as_it_arrives(registry, tmp_path) -> None:
    """Pieces across the answer's 1 MiB blocks, with bytes between them dropped; a body that ends
    early (the blob's end) leaves the last pieces short or empty."""
    path = tmp_path / "blob"
    path.write_bytes(BLOB)
    r = ref(registry.address, repo="test/pieces")
    async with RegistryClient(FAST) as client:
        await client.push_blob_file(r, DIGEST, path, len(BLOB))
        offset, length = 1000, 3 << 20
        pieces = [(0, 10), (10, (1 << 20) + 5), ((1 << 20) + 100, 0), ((2 << 20) - 7, 300_000), (length - 1, 1)]
        got = await client.read_range_pieces(r, DIGEST, offset, length, pieces)
        assert got == [BLOB[offset + a:offset + a + n] for a, n in pieces]
        tail = len(BLOB) - 100  # asked past the end: the registry answers the 100 bytes there are
        got = await client.read_range_pieces(r, DIGEST, tail, 400, [(0, 50), (60, 80), (200, 10)])
        assert got == [BLOB[tail:tail + 50], BLOB[tail + 60:], b""]


async def test_upload_is_chunked_and_cross_repo_mount_skips_it(registry, proxy, tmp_path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(BLOB)
    source, target = ref(proxy.address, "a/source"), ref(proxy.address, "b/target")
    async with RegistryClient(FAST) as client:
        await client.push_blob_file(source, DIGEST, path, len(BLOB))
        patches = [p for m, p, _ in proxy.requests if m == "PATCH"]
        assert len(patches) == 13  # 3 MiB + 11 bytes in 256 KiB pieces
        proxy.requests.clear()
        await client.push_blob_file(target, DIGEST, path, len(BLOB), mount_from=source)
        assert not [m for m, _, _ in proxy.requests if m == "PATCH"]
        assert any("mount=" in p for m, p, _ in proxy.requests if m == "POST")
        assert await client.blob_size(target, DIGEST) == len(BLOB)


async def test_manifest_by_tag_and_digest_and_platform_from_an_index(registry) -> None:
    r = ref(registry.address, "multi/arch", "v1")
    async with RegistryClient(FAST) as client:
        config_digest = await client.push_blob_bytes(r, b"{}")
        digests = {}
        for arch in ("arm64", "amd64"):
            manifest = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "layers": [],
                                   "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest, "size": 2},
                                   "annotations": {"arch": arch}}).encode()
            digests[arch] = await client.push_manifest(r.with_tag(arch), manifest, mt.OCI_MANIFEST)
        index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
            {"mediaType": mt.OCI_MANIFEST, "digest": digests[a], "size": 1, "platform": {"os": "linux", "architecture": a}}
            for a in ("arm64", "amd64")]}).encode()
        await client.push_manifest(r, index, mt.OCI_INDEX)
        image, parent = await client.resolve_image(r)
        assert image.digest == digests["amd64"] and parent is not None and parent.media_type == mt.OCI_INDEX
        by_digest = await client.get_manifest(r.with_digest(digests["arm64"]))
        assert json.loads(by_digest.body)["annotations"]["arch"] == "arm64"
    async with RegistryClient(replace(FAST, platform="linux/s390x")) as client:
        with pytest.raises(UnsupportedError, match="amd64"):
            await client.resolve_image(r)


async def test_retries_on_500_and_429_then_succeeds(registry, proxy) -> None:
    r = ref(proxy.address)
    async with RegistryClient(FAST) as client:
        await client.push_blob_bytes(r, BLOB)
        proxy.fail("/blobs/sha256", status=500, times=2)
        proxy.fail("/blobs/sha256", status=429, times=1, headers={"Retry-After": "0"})
        assert await client.read_range(r, DIGEST, 0, 10) == BLOB[:10]


async def test_a_cut_download_resumes_with_a_range_request(registry, proxy) -> None:
    r = ref(proxy.address)
    async with RegistryClient(FAST) as client:
        await client.push_blob_bytes(r, BLOB)
        proxy.requests.clear()
        proxy.cut(f"/blobs/{DIGEST}", after=1_000_000)
        data = b"".join([b async for b in client.stream_blob(r, DIGEST)])
    assert data == BLOB
    ranges = [rng for m, p, rng in proxy.requests if m == "GET" and DIGEST in p]
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


async def test_a_corrupted_body_is_detected(registry, proxy) -> None:
    r = ref(proxy.address)
    async with RegistryClient(FAST) as client:
        await client.push_blob_bytes(r, BLOB)
        proxy.corrupt(f"/blobs/{DIGEST}")
        with pytest.raises(DigestMismatchError):
            b"".join([b async for b in client.stream_blob(r, DIGEST)])


async def test_missing_things_and_dead_registries_give_clear_errors(registry) -> None:
    async with RegistryClient(FAST) as client:
        with pytest.raises(NotFoundError, match="not found"):
            await client.get_manifest(ref(registry.address, "no/such", "tag"))
        with pytest.raises(RegistryUnreachableError, match="cannot reach registry 127.0.0.1:1"):
            await client.get_manifest(ref("127.0.0.1:1"))
