"""Credentials from docker config.json against real registries with Basic and Bearer-token auth."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from peerpull.testbed.oci_layout import LayerSpec, write_layout
from tests.support.auth_registry import PASSWORD, USER, TokenServer, htpasswd_registry, write_docker_config
from tests.support.cli import final_error


@pytest.fixture(scope="module")
def small_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layer = LayerSpec()
    layer.add("hello.txt", b"hello from an authenticated registry\n" * 1000)
    root = tmp_path_factory.mktemp("auth") / "layout"
    write_layout(root, [layer.tar_bytes()])
    return root


def run_peerpull(docker_config: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--docker-config", str(docker_config / "config.json")] if docker_config else []
    return subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "error", *flags, *args],
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    error = final_error(result.stderr)
    assert error.lines == 1, result.stderr
    for needle in needles:
        assert needle in error.message
    assert PASSWORD not in result.stderr


def exercise(address: str, layout: Path, tmp_path: Path) -> None:
    good = write_docker_config(tmp_path / "good", address, USER, PASSWORD)
    bad = write_docker_config(tmp_path / "bad", address, USER, "wrong-password")
    target = f"{address}/private/app:seekable"
    ok = run_peerpull(good, "convert", "--quiet", f"oci:{layout}:latest", target)
    assert ok.returncode == 0, ok.stderr
    inspected = run_peerpull(good, "inspect", "--json", target)
    assert inspected.returncode == 0 and '"seekable": true' in inspected.stdout
    assert_one_line_error(run_peerpull(bad, "inspect", target), 6, address)
    assert_one_line_error(run_peerpull(None, "inspect", target), 6, "anonymous")


def test_basic_auth_from_docker_config(tmp_path: Path, small_layout: Path) -> None:
    with htpasswd_registry(tmp_path / "registry") as registry:
        exercise(registry.address, small_layout, tmp_path)


def test_bearer_token_auth_from_docker_config(tmp_path: Path, small_layout: Path) -> None:
    loop = asyncio.new_event_loop()
    server = TokenServer(tmp_path / "token")
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        with server.registry(tmp_path / "registry") as registry:
            exercise(registry.address, small_layout, tmp_path)
        assert server.issued >= 2  # the registry really sent us to the token server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_concurrent_first_requests_all_authenticate(tmp_path: Path, small_layout: Path) -> None:
    """Requests sent before any credentials were known all get 401; each must retry with the
    credentials another one obtained meanwhile, not report them refused (the node daemon resolves
    several layers of an image at once)."""
    from converter.registry.client import RegistryClient
    from converter.registry.config import RegistryConfig
    from converter.registry.reference import ImageReference

    with htpasswd_registry(tmp_path / "registry") as registry:
        good = write_docker_config(tmp_path / "good", registry.address, USER, PASSWORD)
        target = f"{registry.address}/private/app:seekable"
        assert run_peerpull(good, "convert", "--quiet", f"oci:{small_layout}:latest", target).returncode == 0

        async def many() -> set[str]:
            async with RegistryClient(RegistryConfig(docker_config=str(good / "config.json"))) as client:
                fetched = await asyncio.gather(*(client.get_manifest(ImageReference.parse(target)) for _ in range(12)))
            return {f.digest for f in fetched}

        assert len(asyncio.run(many())) == 1
