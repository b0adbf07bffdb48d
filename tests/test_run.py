"""`peerpull run` (both modes, completion and readiness, global options reaching its daemon,
fallbacks reported) and `peerpull clean` of a kept set-up, on private set-ups."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.registry.config import RegistryConfig
from peerpull.testbed.registry import EmbeddedRegistry, free_port
from peerpull.testbed.runner import RunOptions, run_image
from tests.support import images
from tests.support.cli import assert_one_line_error, peerpull_cmd
from tests.support.lazy_stack import LazyStack
from tests.support.local_address import non_loopback_address

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def web_image(lazy_stack: LazyStack) -> dict[str, str]:
    """busybox serving /www over HTTP on a port given as argument, and 24 MiB it never reads."""
    layer = images.LayerBuilder()
    layer.dir("www")
    layer.file("www/index.html", b"ready\n")
    layer.dir("data")
    layer.file("data/unused.bin", os.urandom(24 << 20))
    layout = lazy_stack.root / "web"
    images.write_oci_image(layout, [images.busybox_layer().tar_bytes(), layer.tar_bytes()],
                           entrypoint=["/bin/busybox"], cmd=["echo", "no port given"])
    source = images.push_layout(layout, lazy_stack.registry.address, "web/original")
    target = f"{lazy_stack.registry.address}/web/seekable:1"
    lazy_stack.convert(source, target, images.CHUNK)
    return {"source": source, "target": target}


def test_run_reports_timings_and_bytes_in_both_modes(web_image: dict[str, str], tmp_path: Path) -> None:
    results = {}
    for mode, image in (("normal", web_image["source"]), ("lazy", web_image["target"])):
        out = tmp_path / f"{mode}.json"
        r = _run("run", "--mode", mode, image, "--json", str(out), "--", "echo", "hello from run")
        assert r.returncode == 0, r.stderr[-3000:]
        results[mode] = json.loads(out.read_text())
    for res in results.values():
        assert res["exit_code"] == 0 and res["output"] == "hello from run"
        assert 0 < res["start_s"] <= res["ready_s"] and res["first_log_s"] <= res["ready_s"], res
    assert results["normal"]["registry_wire_bytes"] > 24 << 20
    assert results["lazy"]["registry_wire_bytes"] < results["normal"]["registry_wire_bytes"] / 5
    assert results["lazy"]["bytes_by_tier"]["origin"] > 0  # busybox came from the registry, through the fetcher
    # its private daemon recorded the start and, stopping, kept the profile and pushed it next to the image
    assert _has_profile(web_image["target"])


def _has_profile(image: str) -> bool:
    from converter.registry.client import RegistryClient
    from converter.registry.reference import ImageReference
    from snapshotter.service.profiles_source import registry_profile

    async def find() -> bool:
        async with RegistryClient(RegistryConfig()) as client:
            ref = ImageReference.parse(image)
            digest = (await client.get_manifest(ref)).digest
            return await registry_profile(client, image, digest) is not None

    return asyncio.run(find())


def test_run_readiness_mode_waits_for_the_endpoint(web_image: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    r = _run("run", web_image["target"], "--benchmark-mode", "readiness",
             "--readiness-endpoint", f"http://127.0.0.1:{port}/index.html", "--json", "-", "--quiet",
             "--", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["ready_s"] is not None and res["ready_s"] >= res["start_s"] > 0


def test_run_needs_an_endpoint_for_readiness(web_image: dict[str, str]) -> None:
    r = _run("run", web_image["target"], "--benchmark-mode", "readiness")
    assert r.returncode == 2 and "--readiness-endpoint" in r.stderr and "Traceback" not in r.stderr


def test_clean_removes_a_kept_set_up(web_image: dict[str, str], tmp_path: Path) -> None:
    work_root = tmp_path / "runs"
    r = _run("run", web_image["target"], "--work-dir", str(work_root / "one"), "--keep", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work_root / "one" / "daemon").is_dir()
    r = _run("clean", "--work-root", str(work_root))
    assert r.returncode == 0, r.stderr
    assert not work_root.exists()
    mounts = Path("/proc/self/mounts").read_text()
    assert str(work_root) not in mounts


@pytest.fixture(scope="module")
def insecure_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A seekable image on a registry at a non-loopback address, which speaks plain HTTP only:
    reachable only with --insecure-registry. Yields (registry address, image)."""
    root = tmp_path_factory.mktemp("insecure")
    with non_loopback_address() as host, EmbeddedRegistry(root / "registry", host=host) as registry:
        layout = root / "layout"
        images.build_simple_image(layout, {"data/blob.bin": os.urandom(4 << 20)}, cmd=["/bin/busybox", "echo", "hi"])
        source = images.push_layout(layout, registry.address, "insecure/app")
        target = f"{registry.address}/insecure/app:seekable"
        r = _run("--insecure-registry", registry.address, "convert", "--quiet", source, target)
        assert r.returncode == 0, r.stderr[-3000:]
        yield registry.address, target


def test_run_passes_insecure_registry_to_its_daemon(insecure_image: tuple[str, str]) -> None:
    """The private daemon must get --insecure-registry too, or every layer falls back to a full download."""
    address, image = insecure_image
    r = _run("--insecure-registry", address, "run", image, "--json", "-", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["output"] == "hi" and res["exit_code"] == 0
    assert res["layers"] == res["lazy_layers"] == 2 and res["fallback_layers"] == [], res
    assert res["mode_summary"] == "lazy" and res["bytes_by_tier"]["download"] == 0
    assert res["registry_wire_bytes"] > 0 and res["bytes_by_tier"]["origin"] > 0, res


def test_a_daemon_without_the_insecure_setting_is_reported_as_fallback(insecure_image: tuple[str, str],
                                                                       tmp_path: Path) -> None:
    """The issue's case, forced: the daemon alone lacks the setting (its TLS handshake fails on a
    plain-HTTP registry), so pull downloads both layers; the result names them and the daemon's reason."""
    address, image = insecure_image
    opts = RunOptions(image, work_dir=str(tmp_path / "setup"), daemon_env={"PEERPULL_REGISTRY_INSECURE_HOSTS": ""})
    res = asyncio.run(run_image(opts, RegistryConfig(insecure_hosts=(address,))))
    assert res.exit_code == 0 and res.output == "hi"
    assert res.lazy_layers == 0 and len(res.fallback_layers) == 2, res
    assert res.mode_summary == "lazy (2 of 2 layers fell back)"
    assert res.fallback_reasons and all(address in reason for reason in res.fallback_reasons), res.fallback_reasons
    assert res.bytes_by_tier["download"] > 0 and res.registry_wire_bytes >= res.bytes_by_tier["download"]
    assert not (tmp_path / "setup").exists()


def test_run_reports_layers_that_fell_back(web_image: dict[str, str], tmp_path: Path) -> None:
    """Lazy mode on an image that was never converted: every layer is downloaded in full, and the
    summary, the JSON and the bytes say so (exit 0 with a warning line)."""
    out = tmp_path / "fell-back.json"
    r = _run("run", web_image["source"], "--json", str(out), "--", "echo", "ran anyway")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["output"] == "ran anyway"
    assert res["lazy_layers"] == 0 and len(res["fallback_layers"]) == res["layers"] == 2, res
    assert res["mode_summary"] == "lazy (2 of 2 layers fell back)"
    assert any("not seekable" in reason for reason in res["fallback_reasons"]), res
    assert res["bytes_by_tier"]["download"] > 24 << 20 and res["registry_wire_bytes"] >= res["bytes_by_tier"]["download"]
    assert "lazy (2 of 2 layers fell back)" in r.stdout and "warning: " in r.stdout


def test_run_checks_the_json_path_before_any_work(web_image: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "never-made"
    r = peerpull_cmd("run", web_image["target"], "--work-dir", str(work), "--json", str(tmp_path / "no" / "such" / "x.json"))
    assert_one_line_error(r, 2, "--json")
    assert not work.exists()


def test_run_refuses_a_work_dir_holding_other_files(web_image: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("keep\n")
    r = peerpull_cmd("run", web_image["target"], "--work-dir", str(work))
    assert_one_line_error(r, 2, "is not empty")
    assert (work / "notes.txt").read_text() == "keep\n"


def test_run_survives_output_lines_longer_than_any_buffer(web_image: dict[str, str], tmp_path: Path) -> None:
    # 300 kB without a newline (binary output, a progress bar): the container finishes and the lines after it show
    out = tmp_path / "long.json"
    r = _run("run", web_image["target"], "--timeout", "120", "--json", str(out), "--",
             "sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x; echo; echo after the long line", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["exit_code"] == 0 and res["output"].endswith("after the long line"), res["output"][-200:]
    assert max(len(line) for line in res["output"].split("\n")) <= 4096
