"""`peerpull convert` / `inspect` against a real Distribution registry."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from converter.format import toc as fmt
from converter.format.digest import sha256_digest
from converter.format.layer_reader import location_from_annotations, read_chunk, read_toc
from converter.registry import media_types as mt
from converter.registry.blob_reader import RegistryBlobReader
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from tests.support.image_fixtures import push_layout
from tests.support.images import CHUNK
from tests.support.images import corner_case_layer_tars as corner_case_layers


def peerpull(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", *args],
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"peerpull {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


async def fetch_image(ref: str) -> tuple[dict, dict, dict[str, bytes]]:
    """Manifest, config and every layer blob of an image."""
    reference = ImageReference.parse(ref)
    async with RegistryClient(RegistryConfig()) as client:
        fetched, _ = await client.resolve_image(reference)
        manifest = json.loads(fetched.body)
        config = json.loads(await client.get_blob_bytes(reference, manifest["config"]["digest"]))
        blobs = {d["digest"]: await client.get_blob_bytes(reference, d["digest"], max_bytes=1 << 30) for d in manifest["layers"]}
    return manifest, config, blobs


@pytest.fixture(scope="module")
def converted(registry_session, corner_case_layout: Path) -> dict[str, str]:
    source = push_layout(corner_case_layout, registry_session.address, "corner/original")
    target = f"{registry_session.address}/corner/seekable:1"
    out = peerpull("convert", source, target, "--chunk-size", str(CHUNK), "--json", "-", "--quiet")
    report = json.loads(out.stdout)
    return {"source": source, "target": target, "manifest": report["manifest_digest"]}


def test_converted_layers_decompress_to_the_source_tar(converted: dict[str, str]) -> None:
    manifest, config, blobs = asyncio.run(fetch_image(converted["target"]))
    sources = corner_case_layers()
    assert len(manifest["layers"]) == len(sources)
    assert manifest["mediaType"] == mt.OCI_MANIFEST
    for desc, source_tar, diff_id in zip(manifest["layers"], sources, config["rootfs"]["diff_ids"]):
        assert desc["mediaType"] == mt.OCI_LAYER_ZSTD
        assert desc["annotations"][fmt.ANNOTATION_CHUNK_SIZE] == str(CHUNK)
        blob = blobs[desc["digest"]]
        plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
        assert plain == source_tar  # same entries, metadata and content: the very same bytes
        assert diff_id == sha256_digest(source_tar)
    assert manifest["annotations"][fmt.ANNOTATION_IMAGE_SOURCE].startswith("sha256:")


def test_every_chunk_read_alone_through_range_requests(converted: dict[str, str]) -> None:
    async def check() -> int:
        ref = ImageReference.parse(converted["target"])
        checked = 0
        async with RegistryClient(RegistryConfig()) as client:
            manifest = json.loads((await client.resolve_image(ref))[0].body)
            for desc, source_tar in zip(manifest["layers"], corner_case_layers()):
                reader = RegistryBlobReader(client, ref, desc["digest"], desc["size"])
                _, toc = await read_toc(reader, location_from_annotations(desc["annotations"]))
                src = tarfile.open(fileobj=io.BytesIO(source_tar))
                contents = {fmt.normalize_path(m.name): src.extractfile(m).read() for m in src.getmembers() if m.isreg()}
                for entry in toc.entries:
                    for chunk in entry.chunks:
                        data = await read_chunk(reader, chunk)
                        assert data == contents[entry.path][chunk.file_offset:chunk.file_offset + chunk.length]
                        checked += 1
        return checked

    assert asyncio.run(check()) > 20


def test_inspect_reports_a_seekable_image(converted: dict[str, str]) -> None:
    info = json.loads(peerpull("inspect", converted["target"], "--json").stdout)
    assert info["seekable"] is True
    assert all(layer["seekable"] and layer["chunks"] > 0 and layer["toc_bytes"] > 0 for layer in info["layers"])
    original = json.loads(peerpull("inspect", converted["source"], "--json").stdout)
    assert original["seekable"] is False


def test_conversion_is_deterministic(registry_session, converted: dict[str, str], corner_case_layout: Path) -> None:
    again = f"{registry_session.address}/corner/again:1"
    report = json.loads(peerpull("convert", converted["source"], again, "--chunk-size", str(CHUNK), "--json", "-",
                                 "--quiet", "--jobs", "1").stdout)
    assert report["manifest_digest"] == converted["manifest"]
    from_layout = json.loads(peerpull("convert", f"oci:{corner_case_layout}:latest", again, "--chunk-size", str(CHUNK),
                                      "--json", "-", "--quiet").stdout)
    assert [x["digest"] for x in from_layout["layers"]] == [x["digest"] for x in report["layers"]]


def test_converting_a_seekable_image_is_a_noop(registry_session, converted: dict[str, str]) -> None:
    out = peerpull("convert", converted["target"], f"{registry_session.address}/corner/copy:1")
    assert "already seekable" in out.stdout
    manifest, _, _ = asyncio.run(fetch_image(f"{registry_session.address}/corner/copy:1"))
    assert all(desc["mediaType"] == mt.OCI_LAYER_ZSTD for desc in manifest["layers"])
    refused = peerpull("convert", converted["target"], converted["target"], "--quiet", check=False)
    assert refused.returncode == 2 and "--force" in refused.stderr.strip().splitlines()[-1]
    report = json.loads(peerpull("convert", converted["target"], converted["target"], "--force", "--json", "-",
                                 "--quiet").stdout)
    assert report["already_seekable"] is True and report["manifest_digest"] == converted["manifest"]


def test_format_version_1_on_request_and_inspect_shows_version_and_frames(
        registry_session, converted: dict[str, str]) -> None:
    v1 = f"{registry_session.address}/corner/v1:1"
    report = json.loads(peerpull("convert", converted["source"], v1, "--chunk-size", str(CHUNK), "--format-version",
                                 "1", "--json", "-", "--quiet").stdout)
    assert {layer["format_version"] for layer in report["layers"]} == {1}
    assert all(layer["frames"] == layer["chunks"] for layer in report["layers"])
    manifest, config, blobs = asyncio.run(fetch_image(v1))
    v2_manifest, v2_config, _ = asyncio.run(fetch_image(converted["target"]))
    assert config["rootfs"]["diff_ids"] == v2_config["rootfs"]["diff_ids"]  # the same tar either way
    assert {d["annotations"][fmt.ANNOTATION_VERSION] for d in manifest["layers"]} == {"1"}
    assert {d["annotations"][fmt.ANNOTATION_VERSION] for d in v2_manifest["layers"]} == {"2"}  # the default
    old = json.loads(peerpull("inspect", v1, "--json").stdout)["layers"]
    new = json.loads(peerpull("inspect", converted["target"], "--json").stdout)["layers"]
    assert [layer["format_version"] for layer in old] == [1] * len(old)
    assert [layer["format_version"] for layer in new] == [2] * len(new)
    assert all(o["frames"] == o["chunks"] and n["frames"] <= n["chunks"] for o, n in zip(old, new))
    assert sum(n["frames"] for n in new) < sum(o["frames"] for o in old)  # small files packed
    table = peerpull("inspect", converted["target"]).stdout
    assert "format" in table and "frames" in table
