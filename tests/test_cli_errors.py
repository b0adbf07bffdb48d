"""Bad input gives one clear error line and a stable non-zero exit code, never a traceback."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from converter.format import toc as fmt
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from peerpull.testbed.oci_layout import LayerSpec, write_layout
from tests.support.cli import assert_one_line_error, final_error, peerpull_cmd


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """With the defaults a user gets (no --log-level: JSON logs when stderr is not a terminal)."""
    return peerpull_cmd(*args)


def assert_error(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert_one_line_error(result, code, needle)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    layer = LayerSpec()
    layer.add("data.bin", bytes(range(256)) * 4096)
    write_layout(tmp_path / "layout", [layer.tar_bytes()])
    return tmp_path / "layout"


def _blob_path(registry, digest: str) -> Path:
    return (registry.root / "storage" / "docker" / "registry" / "v2" / "blobs" / "sha256" / digest[7:9] / digest[7:] / "data")


def test_unreachable_registry_missing_tag_and_bad_reference(registry) -> None:
    assert_error(run("convert", "127.0.0.1:1/app:1", f"{registry.address}/x:y"), 5, "cannot reach registry 127.0.0.1:1")
    assert_error(run("inspect", f"{registry.address}/app:missing"), 7, "not found")
    assert_error(run("inspect", "Not A Reference"), 2, "invalid image reference")
    assert_error(run("convert", "oci:/nonexistent/dir", f"{registry.address}/x:y"), 2, "not an OCI image layout")


def test_bad_flag_values_are_usage_errors(registry) -> None:
    result = run("convert", "a", "b", "--chunk-size", "12parsecs")
    assert result.returncode == 2 and "not a size" in result.stderr and "Traceback" not in result.stderr
    assert_error(run("convert", "--chunk-size", "1KiB", f"{registry.address}/a:b", f"{registry.address}/c:d"), 2, "chunk_size")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_corrupt_source_blob(registry, layout: Path, damage: str) -> None:
    source = f"{registry.address}/damaged/{damage}:1"
    assert run("convert", "--quiet", f"oci:{layout}:latest", f"{registry.address}/ok/copy:1").returncode == 0
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{source}"],
                   check=True, capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    path = _blob_path(registry, manifest["layers"][0]["digest"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:100] + bytes([data[100] ^ 1]) + data[101:])
    result = run("convert", source, f"{registry.address}/damaged/out:1")
    assert result.returncode in (3, 5), result.stderr
    message = final_error(result.stderr).message
    assert any(word in message for word in ("corrupt", "truncated", "digest", "failing"))


def test_a_lying_footer_or_toc_is_a_format_error(registry, layout: Path) -> None:
    target = f"{registry.address}/lying/app:1"
    assert run("convert", "--quiet", f"oci:{layout}:latest", target).returncode == 0

    async def damage(position: str) -> str:
        ref = ImageReference.parse(target)
        async with RegistryClient(RegistryConfig()) as client:
            fetched, _ = await client.resolve_image(ref)
            manifest = json.loads(fetched.body)
            desc = manifest["layers"][0]
            blob = bytearray(await client.get_blob_bytes(ref, desc["digest"]))
            if position == "footer":  # point the TOC somewhere else
                blob[-fmt.FOOTER_SIZE + 24] ^= 0x10
            else:  # damage the TOC but keep the annotations' digest
                blob[int(desc["annotations"][fmt.ANNOTATION_TOC_OFFSET]) + 20] ^= 0xFF
            desc["digest"] = await client.push_blob_bytes(ref, bytes(blob))
            lying = ref.with_tag(position)
            await client.push_manifest(lying, json.dumps(manifest).encode(), fetched.media_type)
            return str(lying)

    for position in ("footer", "toc"):
        assert_error(run("inspect", asyncio.run(damage(position))), 3, "TOC")


def test_every_command_explains_itself() -> None:
    for args in (["--help"], ["convert", "--help"], ["inspect", "--help"]):
        result = run(*args)
        assert result.returncode == 0 and "usage: peerpull" in result.stdout
    assert "oci:DIR" in run("convert", "--help").stdout
    assert "Exit codes" in run("--help").stdout


def test_pull_without_containerd_says_so(registry, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    spec = LayerSpec()
    spec.add("hello.txt", b"hi\n")
    write_layout(layout, [spec.tar_bytes()])
    ref = f"{registry.address}/cli/pull:1"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{ref}"],
                   check=True, capture_output=True)
    result = run("pull", ref, "--address", str(tmp_path / "no-containerd.sock"))
    assert_error(result, 2, "containerd is not reachable")


def test_daemon_config_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[snapshotter]\nprefetch = "sometimes"\n')
    assert_error(run("--config", str(bad), "daemon"), 2, "snapshotter.prefetch must be one of")
    long_socket = "/run/" + "s" * 120 + ".sock"
    result = run("daemon", "--socket", long_socket, "--root", str(tmp_path / "root"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "too long" in result.stderr or "needs root" in result.stderr or "/dev/fuse" in result.stderr
