"""The registry client, `peerpull inspect` and `peerpull convert` against hostile registries.

A HostileServer sits in front of a real Distribution registry and breaks exactly one step
(manifest, config blob, layer blob, blob tail, HEAD, upload, manifest push) in one way: silent,
drip, drip_headers, garbage, endless, huge, oversend. Each case must end within its deadline
(deadlines made small through PEERPULL_REGISTRY_* here; a hang is caught by the guard timeout,
never by a wall-clock assertion) with one error line, a documented exit code and bounded RSS.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest

from converter.format.errors import FormatError, RegistryError, RegistryUnreachableError
from converter.format.layer_reader import location_from_annotations, read_toc_frame
from converter.registry.blob_reader import RegistryBlobReader
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from tests.support.cli import final_error, peerpull_measured
from tests.support.hostile_server import MODES, HostileServer
from tests.support.pushed_images import PushedImage, build_small_layout, push_image, push_seekable

MAX_RSS_MB = 300
GUARD_S = 60  # a case still running after this is a hang
DRIP_INTERVAL = 0.2  # faster than the idle timeout below: only the deadline or the speed floor can stop it
FAST = RegistryConfig(connect_timeout_s=1, read_timeout_s=0.5, request_deadline_s=2, retries=1,
                      backoff_base_s=0.01, backoff_max_s=0.05, min_speed_bytes_s=1024)
FAST_ENV = {
    "PEERPULL_REGISTRY_CONNECT_TIMEOUT_S": "1", "PEERPULL_REGISTRY_READ_TIMEOUT_S": "0.5",
    "PEERPULL_REGISTRY_REQUEST_DEADLINE_S": "2", "PEERPULL_REGISTRY_RETRIES": "1",
    "PEERPULL_REGISTRY_BACKOFF_BASE_S": "0.01", "PEERPULL_REGISTRY_BACKOFF_MAX_S": "0.05",
    "PEERPULL_REGISTRY_MIN_SPEED_BYTES_S": "1024",
}
# exit codes each mode may end with (3 malformed data, 4 registry error, 5 unreachable/deadline)
EXIT_CODES = {"silent": {5}, "drip_headers": {5}, "drip": {3, 4, 5}, "garbage": {4}, "endless": {3, 4},
              "huge": {3, 4}, "oversend": {4}}
# fault kinds the client's counter must show for each mode
FAULTS = {"silent": {"timeout"}, "drip_headers": {"timeout"}, "drip": {"timeout", "stall"}, "garbage": {"not_http"},
          "endless": {"oversized", "no_range", "bad_length"}, "huge": {"oversized", "no_range"},
          "oversend": {"oversized"}}
BASIC_MODES = tuple(m for m in MODES if m != "oversend")


@pytest.fixture(scope="module")
def images(registry_session, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PushedImage]:
    layout = build_small_layout(tmp_path_factory.mktemp("hostile") / "layout")
    return {
        "plain": asyncio.run(push_image(layout, registry_session.address, "hostile/plain")),
        "seekable": asyncio.run(push_seekable(layout, registry_session.address, "hostile/seekable")),
    }


@pytest.fixture
def hostile(registry_session):
    with HostileServer(upstream=registry_session.url) as server:
        yield server


def via(image: PushedImage, server: HostileServer, registry_session) -> str:
    return image.ref.replace(registry_session.address, server.address, 1)


def fast_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERPULL_")}
    env.update(FAST_ENV)
    env.update(extra)
    return env


def check_cli_failure(m, mode: str, address: str) -> None:
    assert m.returncode != -9, f"hung: killed after {GUARD_S} s; stderr: {m.stderr[-2000:]}"
    assert m.returncode in EXIT_CODES[mode], (m.returncode, m.stderr[-2000:])
    err = final_error(m.stderr)
    assert err.lines == 1, m.stderr  # the error alone: no retry, info or warning lines before it
    assert err.exit_code == m.returncode
    if m.returncode in (4, 5):
        assert address in err.message, err.message
    assert m.peak_rss_mb < MAX_RSS_MB, m.peak_rss_mb


# ---- the client, directly -------------------------------------------------------------------

CLIENT_STEPS = ("manifest", "config", "head", "range", "stream")


async def _client_step(client: RegistryClient, step: str, image: PushedImage, ref: ImageReference) -> object:
    layer = image.manifest["layers"][-1]
    if step == "manifest":
        return await client.get_manifest(ref)
    if step == "config":
        return await client.get_blob_bytes(ref, image.config_digest)
    if step == "head":
        return await client.blob_size(ref, layer["digest"])
    if step == "range":
        return await client.read_range(ref, layer["digest"], layer["size"] - 4096, 4096)
    return [len(b) async for b in client.stream_blob(ref, layer["digest"], size=layer["size"])]


def _pattern(step: str, image: PushedImage) -> str:
    return {"manifest": "/manifests/", "config": image.config_digest}.get(step, image.layer_digests[-1])


@pytest.mark.parametrize("step,mode", [(s, m) for s in CLIENT_STEPS for m in BASIC_MODES] + [("range", "oversend")])
async def test_client_step_against_hostile_mode(images, registry_session, hostile, step: str, mode: str) -> None:
    image = images["seekable" if step == "range" else "plain"]
    # a drip announcing the blob's true size: only the speed floor tells it from a slow registry
    hostile.add(_pattern(step, image), mode, interval=DRIP_INTERVAL, length=image.manifest["layers"][-1]["size"])
    ref = ImageReference.parse(via(image, hostile, registry_session))
    async with RegistryClient(FAST) as client:
        if step == "head" and mode == "drip":
            # honest headers, a body that never comes: HEAD needs no body, the size is what it says
            size = image.manifest["layers"][-1]["size"]
            assert await asyncio.wait_for(_client_step(client, step, image, ref), GUARD_S) == size
            return
        with pytest.raises((RegistryError, FormatError)) as caught:
            await asyncio.wait_for(_client_step(client, step, image, ref), GUARD_S)
        message = str(caught.value)
        assert "\n" not in message and hostile.address in message, message
        if mode in ("silent", "drip_headers"):
            assert isinstance(caught.value, RegistryUnreachableError)
        # a HEAD answer followed by a body is a broken HTTP exchange for the parser: not_http is right too
        expected = FAULTS[mode] | ({"not_http"} if step == "head" else set())
        assert set(client.faults) & expected, (client.faults, message)


@pytest.mark.parametrize("mode", MODES)
async def test_toc_read_of_lazy_prepare_against_hostile_blob(images, registry_session, hostile, mode: str) -> None:
    """snapshotter/service/remote.py reads a TOC exactly so: read_toc_frame over a RegistryBlobReader."""
    image = images["seekable"]
    layer = image.manifest["layers"][-1]
    hostile.add(layer["digest"], mode, interval=DRIP_INTERVAL)
    ref = ImageReference.parse(via(image, hostile, registry_session))
    async with RegistryClient(FAST) as client:
        reader = RegistryBlobReader(client, ref, layer["digest"], layer["size"])
        with pytest.raises((RegistryError, FormatError)):
            await asyncio.wait_for(read_toc_frame(reader, location_from_annotations(layer["annotations"])), GUARD_S)
        assert set(client.faults) & FAULTS[mode], client.faults


async def test_toc_read_through_an_honest_proxy_still_works(images, registry_session, hostile) -> None:
    image = images["seekable"]
    layer = image.manifest["layers"][-1]
    ref = ImageReference.parse(via(image, hostile, registry_session))
    async with RegistryClient(FAST) as client:
        reader = RegistryBlobReader(client, ref, layer["digest"], layer["size"])
        footer, frame = await read_toc_frame(reader, location_from_annotations(layer["annotations"]))
        assert len(frame) == footer.toc_length and not client.faults


async def test_faults_count_retries_and_statuses(images, registry, tmp_path: Path) -> None:
    from tests.support.fault_proxy import FaultProxy

    proxy = await FaultProxy(registry.url).start()
    try:
        layout = build_small_layout(tmp_path / "layout", files=1, size=1000)
        image = await push_image(layout, proxy.address, "faults/app")
        proxy.fail("/manifests/", status=503, times=1)
        async with RegistryClient(FAST) as client:
            await client.get_manifest(ImageReference.parse(image.ref))
            assert client.faults["http_503"] == 1 and client.faults["retry"] == 1
            proxy.fail("/manifests/", status=503, times=5)
            with pytest.raises(RegistryError, match="kept failing"):
                await client.get_manifest(ImageReference.parse(image.ref))
            assert client.faults["http_503"] == 3
    finally:
        await proxy.stop()


async def test_backoff_never_waits_past_the_deadline(images, registry_session, hostile) -> None:
    """A 10 s Retry-After cannot push a 2 s deadline: the client gives up with the registry's answer."""
    from tests.support.fault_proxy import FaultProxy

    proxy = await FaultProxy(registry_session.url).start()
    try:
        proxy.fail("/manifests/", status=503, times=10, headers={"Retry-After": "10"})
        image = images["plain"]
        ref = ImageReference.parse(image.ref.replace(registry_session.address, proxy.address, 1))
        async with RegistryClient(replace(FAST, backoff_max_s=30, retries=5)) as client:
            with pytest.raises(RegistryError, match="HTTP 503"):
                await asyncio.wait_for(client.get_manifest(ref), GUARD_S)
            assert client.faults["retry"] == 0  # the one wait would have passed the deadline
    finally:
        await proxy.stop()


# ---- peerpull inspect ------------------------------------------------------------------------

@pytest.mark.parametrize("step,mode", [(s, m) for s in ("manifest", "tail") for m in BASIC_MODES] + [("tail", "oversend")])
def test_inspect_against_hostile_mode(images, registry_session, hostile, step: str, mode: str) -> None:
    image = images["seekable"]
    hostile.add("/manifests/" if step == "manifest" else image.layer_digests[-1], mode, interval=DRIP_INTERVAL)
    m = peerpull_measured("inspect", via(image, hostile, registry_session), timeout=GUARD_S, env=fast_env())
    check_cli_failure(m, mode, hostile.address)


@pytest.mark.parametrize("mode", ("endless", "huge", "garbage"))
def test_inspect_with_default_settings(images, registry_session, hostile, mode: str) -> None:
    """No PEERPULL_* at all: the defaults a user gets bound the endless manifest too."""
    hostile.add("/manifests/", mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERPULL_")}
    m = peerpull_measured("inspect", via(images["seekable"], hostile, registry_session), timeout=GUARD_S, env=env)
    check_cli_failure(m, mode, hostile.address)


def test_inspect_through_an_honest_proxy(images, registry_session, hostile) -> None:
    m = peerpull_measured("inspect", "--json", via(images["seekable"], hostile, registry_session),
                          timeout=GUARD_S, env=fast_env())
    assert m.returncode == 0, m.stderr
    assert '"seekable": true' in m.stdout


# ---- peerpull convert: the source registry ---------------------------------------------------

@pytest.mark.parametrize("mode", BASIC_MODES)
@pytest.mark.parametrize("step", ("manifest", "config", "layer", "seekable_layer"))
def test_convert_source_against_hostile_mode(images, registry_session, hostile, step: str, mode: str) -> None:
    """`seekable_layer`: an already-seekable image is copied blob by blob, with no decoder to notice junk."""
    image = images["seekable" if step == "seekable_layer" else "plain"]
    pattern = {"manifest": "/manifests/", "config": image.config_digest}.get(step, image.layer_digests[-1])
    hostile.add(pattern, mode, interval=DRIP_INTERVAL, length=image.manifest["layers"][-1]["size"])
    dest = f"{registry_session.address}/hostile/out-{step}-{mode}:1"
    m = peerpull_measured("convert", "--quiet", via(image, hostile, registry_session), dest,
                          timeout=GUARD_S, env=fast_env())
    check_cli_failure(m, mode, hostile.address)


# ---- peerpull convert: the destination registry ----------------------------------------------

@pytest.mark.parametrize("mode", BASIC_MODES)
@pytest.mark.parametrize("step", ("head", "upload", "manifest"))
def test_convert_destination_against_hostile_mode(images, registry_session, hostile, step: str, mode: str) -> None:
    pattern = {"head": "/dst/blobs/sha256:", "upload": "/blobs/uploads/", "manifest": "/dst/manifests/"}[step]
    hostile.add(pattern, mode, interval=DRIP_INTERVAL)
    dest = f"{hostile.address}/hostile/dst:{step}-{mode}"
    m = peerpull_measured("convert", "--quiet", images["plain"].ref, dest, timeout=GUARD_S, env=fast_env())
    check_cli_failure(m, mode, hostile.address)


def test_convert_with_default_settings_against_an_endless_config(images, registry_session, hostile) -> None:
    hostile.add(images["plain"].config_digest, "endless")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERPULL_")}
    m = peerpull_measured("convert", "--quiet", via(images["plain"], hostile, registry_session),
                          f"{registry_session.address}/hostile/default-out:1", timeout=GUARD_S, env=env)
    check_cli_failure(m, "endless", hostile.address)
    assert "8 MiB" in final_error(m.stderr).message


class _HttpsClient(RegistryClient):
    """Speaks TLS to a registry that serves plain HTTP: what a missing --insecure-registry does."""

    def _base(self, ref: ImageReference) -> str:
        return super()._base(ref).replace("http://", "https://", 1)


async def test_tls_to_a_plain_http_registry_names_the_flag(images, registry_session) -> None:
    ref = ImageReference.parse(images["plain"].ref)
    async with _HttpsClient(FAST) as client:
        with pytest.raises(RegistryError, match=f"--insecure-registry {registry_session.address}") as caught:
            await asyncio.wait_for(client.get_manifest(ref), GUARD_S)
        assert "\n" not in str(caught.value)
        assert client.faults["tls"] == 1 and client.faults["retry"] == 0  # another attempt would not help
