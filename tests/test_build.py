"""`peerpull build`: a Dockerfile built by the real buildah (private vfs storage), converted, pushed,
and run lazily; its one-line errors (buildah missing, no Dockerfile, a failing build, a refused push)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from converter.registry import media_types as mt
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.manifest import parse_manifest
from converter.registry.reference import ImageReference
from peerpull.testbed.registry import EmbeddedRegistry
from tests.support.auth_registry import htpasswd_registry
from tests.support.cli import assert_one_line_error

pytestmark = [pytest.mark.root, pytest.mark.slow]

BUSYBOX = Path("/bin/busybox")
DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /srv && echo built-and-ran-$STAGE > /srv/msg"]
ENV GREETING=hello
CMD ["/bin/busybox", "cat", "/srv/msg"]
"""


def _peerpull(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def context(tmp_path: Path) -> Path:
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (scripts/setup.sh installs it)")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    shutil.copy(BUSYBOX, ctx / "busybox")
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("$STAGE", "1"))
    return ctx


def _layer_types(image: str) -> list[str]:
    async def fetch() -> list[str]:
        async with RegistryClient(RegistryConfig()) as client:
            fetched, _ = await client.resolve_image(ImageReference.parse(image))
            return [d["mediaType"] for d in parse_manifest(fetched.body, fetched.media_type, image)["layers"]]

    return asyncio.run(fetch())


def test_build_pushes_a_seekable_image_that_runs_lazily(context: Path, registry: EmbeddedRegistry,
                                                        tmp_path: Path) -> None:
    target, original = f"{registry.address}/built/app:seekable", f"{registry.address}/built/app:plain"
    storage = tmp_path / "storage"
    r = _peerpull("build", "-t", target, "--push-original", original, "--storage-dir", str(storage),
                  "--json", "-", "--quiet", str(context))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["destination"] == target and summary["original"] == original
    assert summary["steps"] == 5 and summary["layers"] >= 1 and summary["chunks"] >= 1
    assert summary["uncompressed_bytes"] > BUSYBOX.stat().st_size
    assert set(summary["stages"]) == {"build", "export OCI layout", "push original", "convert + push seekable"}
    assert (storage / "layout" / "index.json").is_file()  # --storage-dir is kept
    assert set(_layer_types(target)) == {mt.OCI_LAYER_ZSTD}
    assert set(_layer_types(original)) == {mt.OCI_LAYER_GZIP}

    run = _peerpull("run", target, "--json", "-", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout)
    assert res["output"] == "built-and-ran-1" and res["exit_code"] == 0, res
    assert res["lazy_layers"] == res["layers"] == summary["layers"] and res["fallback_layers"] == [], res
    assert res["bytes_by_tier"]["origin"] > 0 and res["bytes_by_tier"]["download"] == 0


def test_build_profile_learn_passes_through_to_convert(context: Path, registry: EmbeddedRegistry) -> None:
    """--profile learn: the built image runs once on a private set-up and is converted again with
    the files it read (busybox, /srv/msg) in front of the 8 MB it never reads."""
    (context / "big.bin").write_bytes(os.urandom(8 << 20))
    (context / "Dockerfile").write_text(DOCKERFILE.replace("$STAGE", "2").replace(
        "COPY busybox /bin/busybox\n", "COPY busybox /bin/busybox\nCOPY big.bin /data/big.bin\n"))
    r = _peerpull("build", "-t", f"{registry.address}/built/learn:1", "--profile", "learn", "--json", "-", "--quiet",
                  str(context))
    assert r.returncode == 0, r.stderr[-3000:]
    layout = json.loads(r.stdout)["convert"]["layout"]
    assert layout is not None and layout["moved_files"] >= 2, layout
    assert layout["span_after"] < layout["span_before"], layout
    assert layout["profile_artifact"], layout


def test_build_without_storage_dir_leaves_nothing_and_logs_its_steps(context: Path, registry: EmbeddedRegistry,
                                                                      tmp_path: Path) -> None:
    before = set(Path("/var/tmp").glob("peerpull-build-*"))
    r = subprocess.run([sys.executable, "-m", "peerpull", "build", "-t", f"{registry.address}/built/logs:1",
                        "-f", str(context / "Dockerfile"), str(context)], capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    steps = [e for e in events if e["event"] == "build_step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5] and steps[1]["instruction"] == "COPY busybox /bin/busybox"
    assert any(e["event"] == "convert_layer_done" for e in events)
    assert "5 steps, 1 layers: built" in r.stdout and "chunks in" in r.stdout, r.stdout
    assert set(Path("/var/tmp").glob("peerpull-build-*")) - before == set()


def test_on_a_terminal_build_shows_a_bar_instead_of_log_events(context: Path, registry: EmbeddedRegistry) -> None:
    """Under a pseudo-terminal (script(1)): the step bar is drawn, and no structured events are written."""
    cmd = f"{sys.executable} -m peerpull build -t {registry.address}/built/tty:1 {context}"
    r = subprocess.run(["script", "-qfec", cmd, "/dev/null"], capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-3000:]
    assert re.search(r"STEP [1-5]/5", r.stdout), r.stdout[-3000:]
    assert "build_step" not in r.stdout and "progress_started" not in r.stdout
    assert "5 steps, 1 layers" in r.stdout


def test_build_without_buildah_names_the_package(context: Path, registry: EmbeddedRegistry, tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    r = _peerpull("build", "-t", f"{registry.address}/x:1", str(context), env={**os.environ, "PATH": str(empty)})
    assert_one_line_error(r, 2, "install Debian's buildah package")


def test_build_without_a_dockerfile(context: Path, registry: EmbeddedRegistry) -> None:
    r = _peerpull("build", "-t", f"{registry.address}/x:1", "-f", str(context / "Nope.dockerfile"), str(context))
    assert_one_line_error(r, 2, "Nope.dockerfile not found")


def test_a_failing_build_ends_with_buildahs_last_lines(context: Path, registry: EmbeddedRegistry) -> None:
    (context / "Dockerfile").write_text("FROM scratch\nCOPY busybox /bin/busybox\nCOPY missing.txt /x\n")
    r = _peerpull("build", "-t", f"{registry.address}/x:1", str(context))
    err = assert_one_line_error(r, 1, "buildah build of")
    assert "missing.txt" in err.message, err.message


@pytest.fixture
def auth_registry(tmp_path: Path):  # type: ignore[no-untyped-def]
    with htpasswd_registry(tmp_path / "auth-registry") as reg:
        yield reg


def test_a_refused_push_is_one_line(context: Path, auth_registry: EmbeddedRegistry,
                                    registry: EmbeddedRegistry) -> None:
    r = _peerpull("build", "-t", f"{auth_registry.address}/app:1", str(context))
    assert_one_line_error(r, 6, auth_registry.address)
    r = _peerpull("build", "-t", f"{registry.address}/app:1", "--push-original", f"{auth_registry.address}/app:plain",
                  str(context))
    err = assert_one_line_error(r, 6, "pushing the original image")
    assert auth_registry.address in err.message
