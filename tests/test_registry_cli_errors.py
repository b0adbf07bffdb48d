"""Ordinary mistakes around registries and layouts: one line, a documented exit code, no work done first."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from converter.format.errors import NotFoundError
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from tests.support.cli import assert_one_line_error, peerpull_cmd
from tests.support.pushed_images import build_small_layout, push_image


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_layout(tmp_path_factory.mktemp("cli-errors") / "layout", files=1, size=5000)


@pytest.fixture(scope="module")
def plain(registry_session, layout: Path) -> str:
    return asyncio.run(push_image(layout, registry_session.address, "errors/plain")).ref


def _exists(ref: str) -> bool:
    async def look() -> bool:
        async with RegistryClient(RegistryConfig()) as client:
            try:
                await client.get_manifest(ImageReference.parse(ref))
            except NotFoundError:
                return False
            return True
    return asyncio.run(look())


def _copy_layout(layout: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(layout, to)
    return to


def test_a_port_out_of_range_is_a_usage_error() -> None:
    assert_one_line_error(peerpull_cmd("inspect", "127.0.0.1:99999/app:1"), 2, "port '99999' is not in 1..65535")
    assert_one_line_error(peerpull_cmd("convert", "127.0.0.1:5000/a:1", "127.0.0.1:0/b:1"), 2, "port '0'")


def test_a_layout_whose_manifests_is_not_a_list(layout: Path, tmp_path: Path, registry_session) -> None:
    bad = _copy_layout(layout, tmp_path / "bad")
    (bad / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": {"not": "a list"}}))
    result = peerpull_cmd("convert", f"oci:{bad}", f"{registry_session.address}/errors/x:1")
    assert_one_line_error(result, 3, "'manifests' is not a list")


@pytest.mark.parametrize("lie", ["bigger", "smaller", "negative", "huge"])
def test_a_layout_descriptor_whose_size_lies(layout: Path, tmp_path: Path, registry_session, lie: str) -> None:
    bad = _copy_layout(layout, tmp_path / "bad")
    index = json.loads((bad / "index.json").read_text())
    blob = bad / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    manifest = json.loads(blob.read_bytes())
    layer = manifest["layers"][0]
    layer["size"] = {"bigger": layer["size"] + 1, "smaller": layer["size"] - 1, "negative": -1, "huge": 1 << 50}[lie]
    body = json.dumps(manifest).encode()
    from converter.format.digest import sha256_digest

    digest = sha256_digest(body)
    (bad / "blobs" / "sha256" / digest[7:]).write_bytes(body)
    index["manifests"][0].update(digest=digest, size=len(body))
    (bad / "index.json").write_text(json.dumps(index))
    dest = f"{registry_session.address}/errors/lying-{lie}:1"
    result = peerpull_cmd("convert", f"oci:{bad}", dest)
    assert_one_line_error(result, 3, "descriptor of")
    assert not _exists(dest)


def test_an_unwritable_json_report_is_refused_before_the_push(plain: str, registry_session, tmp_path: Path) -> None:
    dest = f"{registry_session.address}/errors/json-first:1"
    result = peerpull_cmd("convert", plain, dest, "--json", str(tmp_path / "no" / "such" / "dir" / "report.json"))
    assert_one_line_error(result, 2, "--json")
    assert not _exists(dest)


def test_an_unwritable_work_dir_is_refused_before_the_work(plain: str, registry_session, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    dest = f"{registry_session.address}/errors/workdir-first:1"
    result = peerpull_cmd("convert", plain, dest, "--work-dir", str(a_file))
    assert_one_line_error(result, 2, "work dir")
    assert not _exists(dest)


def test_destination_equal_to_source_needs_force(plain: str) -> None:
    assert_one_line_error(peerpull_cmd("convert", plain, plain), 2, "--force")


def test_an_explicit_platform_the_image_lacks_names_what_it_has(plain: str, layout: Path, registry_session) -> None:
    for source in (plain, f"oci:{layout}"):
        result = peerpull_cmd("--platform", "linux/arm64", "convert", source, f"{registry_session.address}/errors/arm:1")
        assert_one_line_error(result, 8, "linux/amd64")
    assert not _exists(f"{registry_session.address}/errors/arm:1")
    ok = peerpull_cmd("--platform", "linux/amd64", "inspect", plain)
    assert ok.returncode == 0, ok.stderr
    assert peerpull_cmd("inspect", plain).returncode == 0  # the default takes a single-platform image as it is


@pytest.mark.parametrize("damage", ["entry-annotations-list", "entry-platform-string", "manifest-annotations-list",
                                    "deep-json"])
def test_a_layout_with_malformed_fields_is_a_format_error(layout: Path, tmp_path: Path, registry_session,
                                                          damage: str) -> None:
    from converter.format.digest import sha256_digest

    bad = _copy_layout(layout, tmp_path / "bad")
    index = json.loads((bad / "index.json").read_text())
    entry = index["manifests"][0]
    if damage == "entry-annotations-list":
        entry["annotations"] = ["org.opencontainers.image.ref.name"]
        needle = "annotations"
    elif damage == "entry-platform-string":
        index["manifests"] = [dict(entry, platform="linux/amd64"), dict(entry, platform=["x"])]
        needle = "none for linux/amd64"
    else:
        blob = bad / "blobs" / "sha256" / entry["digest"][7:]
        body = b"[" * 100_000 if damage == "deep-json" else json.dumps(
            dict(json.loads(blob.read_bytes()), annotations=["a"])).encode()
        digest = sha256_digest(body)
        (bad / "blobs" / "sha256" / digest[7:]).write_bytes(body)
        entry.update(digest=digest, size=len(body))
        needle = "not valid JSON" if damage == "deep-json" else "annotations"
    (bad / "index.json").write_text(json.dumps(index))
    result = peerpull_cmd("convert", f"oci:{bad}", f"{registry_session.address}/errors/malformed:1")
    assert result.returncode in (3, 7), result.stderr
    assert_one_line_error(result, result.returncode, needle)
