"""Startup profiles: codec and validation, recording, the registry round trip (the tag-schema
fallback on the real Distribution registry, the referrers API through a small fake in front of
it), peers serving them with the cluster token, and read-only credentials."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from converter.format import toc as fmt
from converter.format.errors import FormatError, RegistryNotFoundError
from converter.format.layer_reader import location_from_annotations, read_toc_frame
from converter.registry import media_types as mt
from converter.registry import referrers
from converter.registry.blob_reader import RegistryBlobReader
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from peer.config import PeerConfig
from peer.node import PeerNode
from peerpull import cli
from snapshotter.config import SnapshotterConfig
from snapshotter.service import profiles as pf
from snapshotter.service.profiles_recorder import ProfileRecorder
from snapshotter.service.profiles_source import ProfileFinder
from snapshotter.service.profiles_store import ProfileStore
from tests.support.aio_site import serve_local
from tests.support.auth_registry import PASSWORD, USER, TokenServer, write_docker_config
from tests.support.cli import assert_one_line_error, peerpull_cmd
from tests.support.pushed_images import PushedImage, build_small_layout, push_image, push_seekable
from tests.support.waiting import async_wait_until

FAST = RegistryConfig(retries=1, backoff_base_s=0.01)
L1, L2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
M = "sha256:" + "a" * 64


def chunk(offset: int) -> fmt.Chunk:
    return fmt.Chunk(0, 10, offset, 5, bytes(32))


class Image:
    def __init__(self, pushed: PushedImage, manifest_digest: str) -> None:
        self.ref = pushed.ref
        self.manifest = pushed.manifest
        self.layer_digests = pushed.layer_digests
        self.manifest_digest = manifest_digest


async def pushed(registry, tmp_path: Path, repo: str = "app/profiled", config: RegistryConfig = FAST) -> Image:
    image = await push_image(build_small_layout(tmp_path / "layout", files=1, size=1000), registry.address, repo)
    async with RegistryClient(config) as client:
        fetched = await client.get_manifest(ImageReference.parse(image.ref))
    return Image(image, fetched.digest)


def image_profile(image: Image, offsets: tuple[int, ...] = (0, 4096, 8192)) -> pf.StartupProfile:
    return pf.StartupProfile(image.manifest_digest, tuple((image.layer_digests[0], o) for o in offsets))


# ---- codec and validation ------------------------------------------------------------------


def test_codec_round_trip_keeps_order_and_drops_repeats() -> None:
    profile = pf.StartupProfile(M, ((L2, 7), (L1, 0), (L2, 3), (L1, 0)))
    back = pf.decode(pf.encode(profile), M)
    assert back.reads == ((L2, 7), (L1, 0), (L2, 3))
    assert back.layers == (L2, L1)


@pytest.mark.parametrize("data", [
    b"not json", b"[]", b'{"version": 2}', json.dumps({"version": 1, "manifest_digest": "sha256:xyz"}).encode(),
    json.dumps({"version": 1, "manifest_digest": M, "layers": [L1], "reads": [[1, 0]]}).encode(),
    json.dumps({"version": 1, "manifest_digest": M, "layers": [L1], "reads": [[0, -1]]}).encode(),
    json.dumps({"version": 1, "manifest_digest": M, "layers": ["../x"], "reads": []}).encode(),
    b"[" * 100_000,
    b" " * (pf.MAX_PROFILE_BYTES + 1),
])
def test_corrupt_profiles_are_refused(data: bytes) -> None:
    with pytest.raises(FormatError):
        pf.decode(data, M)


def test_a_profile_for_another_manifest_is_refused() -> None:
    with pytest.raises(FormatError, match="not sha256:b"):
        pf.decode(pf.encode(pf.StartupProfile(M, ((L1, 0),))), "sha256:" + "b" * 64)


def test_stale_entries_are_dropped_one_by_one() -> None:
    profile = pf.StartupProfile(M, ((L1, 0), (L1, 5), (L2, 9), ("sha256:" + "3" * 64, 0)))
    frames = {L1: {0, 100}}
    kept = pf.restrict(profile, frames.get, layers={L1, L2})
    # L1@5 is no frame; L2 is in the image but its TOC is not read here (kept); layer 3 is not in the image
    assert kept.reads == ((L1, 0), (L2, 9))
    assert pf.restrict(profile, lambda blob: set(), layers=None).reads == ()


def test_store_keeps_the_better_profile_and_removes_a_corrupt_file(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path)
    long = pf.StartupProfile(M, ((L1, 0), (L1, 1), (L1, 2)))
    assert store.save(long)
    assert not store.save(pf.StartupProfile(M, ((L1, 9),)))  # fewer chunks: a warmer start, kept the old
    assert store.load(M) == long
    assert not store.save(pf.StartupProfile(M, ((L1, 3), (L1, 1), (L1, 2))))  # as many: not clearly better
    assert store.save(pf.StartupProfile(M, ((L1, 0), (L1, 1), (L1, 2), (L1, 3))))
    store.path(M).write_bytes(b"{garbage")
    assert store.load(M) is None
    assert not store.path(M).exists()


# ---- recording -----------------------------------------------------------------------------


async def test_recorder_keeps_first_reads_in_order_until_quiet() -> None:
    done: list[tuple[str, pf.StartupProfile]] = []

    async def on_done(ref: str, profile: pf.StartupProfile) -> None:
        done.append((ref, profile))

    recorder = ProfileRecorder(quiet_s=0.2, max_s=60, max_chunks=100, on_done=on_done)
    recorder.observe(L1, chunk(1))  # nothing records yet
    assert recorder.start("r/img:1", M, [L1, L2])
    assert not recorder.start("r/img:1", M, [L1, L2])  # a second container of the image
    for blob, offset in ((L2, 50), (L1, 0), (L2, 50), ("sha256:" + "9" * 64, 1), (L1, 7)):
        recorder.observe(blob, chunk(offset))
    await async_wait_until(lambda: bool(done), 10, "the recording to end")
    assert done == [("r/img:1", pf.StartupProfile(M, ((L2, 50), (L1, 0), (L1, 7))))]
    assert not recorder.recording(M)
    recorder.observe(L1, chunk(99))  # ended: not recorded
    await recorder.close()


async def test_recorder_stops_at_the_size_cap() -> None:
    done: list[pf.StartupProfile] = []

    async def on_done(ref: str, profile: pf.StartupProfile) -> None:
        done.append(profile)

    recorder = ProfileRecorder(quiet_s=600, max_s=600, max_chunks=3, on_done=on_done)
    recorder.start("r/img:1", M, [L1])
    for offset in range(10):
        recorder.observe(L1, chunk(offset))
    await async_wait_until(lambda: bool(done), 10, "the capped recording to end")
    assert done[0].reads == ((L1, 0), (L1, 1), (L1, 2))
    await recorder.close()


# ---- the registry ----------------------------------------------------------------------------


async def test_round_trip_through_the_registry_fallback_tag(registry, tmp_path: Path) -> None:
    image = await pushed(registry, tmp_path)
    profile = image_profile(image)
    ref = ImageReference.parse(image.ref)
    async with RegistryClient(FAST) as client:
        assert await client.get_referrers(ref, image.manifest_digest) is None  # Distribution 2.8: no API
        publisher = ProfileFinder(ProfileStore(tmp_path / "a"), client, deadline_s=10)
        first = await publisher.publish(image.ref, profile)
        longer = pf.StartupProfile(profile.manifest_digest, (*profile.reads, (image.layer_digests[0], 12288)))
        second = await publisher.publish(image.ref, longer)
        assert first and second and first != second
        index = json.loads((await client.get_manifest(ref.with_tag(referrers.fallback_tag(image.manifest_digest)))).body)
        assert [e["digest"] for e in index["manifests"]] == [first, second]
        assert {e["artifactType"] for e in index["manifests"]} == {pf.PROFILE_MEDIA_TYPE}
        artifact = json.loads((await client.get_manifest(ref.with_digest(second))).body)
        assert artifact["subject"]["digest"] == image.manifest_digest
        assert artifact["config"]["mediaType"] == mt.OCI_EMPTY

        store = ProfileStore(tmp_path / "b")
        finder = ProfileFinder(store, client, deadline_s=10)
        assert await finder.find(image.ref, image.manifest_digest) == longer  # the newest
        assert store.load(image.manifest_digest) == longer  # kept locally for the next find and for peers


async def test_a_corrupt_artifact_is_skipped_for_an_older_valid_one(registry, tmp_path: Path) -> None:
    image = await pushed(registry, tmp_path)
    ref = ImageReference.parse(image.ref)
    async with RegistryClient(FAST) as client:
        finder = ProfileFinder(ProfileStore(tmp_path / "a"), client, deadline_s=10)
        good = image_profile(image)
        await finder.publish(image.ref, good)
        subject = referrers.Descriptor(mt.OCI_MANIFEST, image.manifest_digest, len(json.dumps(image.manifest)))
        await referrers.push_referrer(client, ref, subject, pf.PROFILE_MEDIA_TYPE, b'{"version": 1, "rea',
                                      pf.PROFILE_MEDIA_TYPE)
        fresh = ProfileFinder(ProfileStore(tmp_path / "b"), client, deadline_s=10)
        assert await fresh.find(image.ref, image.manifest_digest) == good


async def test_stale_profile_from_the_registry_is_ignored(registry, tmp_path: Path) -> None:
    image = await pushed(registry, tmp_path)
    async with RegistryClient(FAST) as client:
        stale = pf.StartupProfile(image.manifest_digest, (("sha256:" + "7" * 64, 0), (image.layer_digests[0], 3)))
        await ProfileFinder(ProfileStore(tmp_path / "a"), client, deadline_s=10).publish(image.ref, stale)

        async def layers(ref: str, digest: str) -> list[str]:
            return image.layer_digests

        finder = ProfileFinder(ProfileStore(tmp_path / "b"), client, deadline_s=10, image_layers=layers,
                               frames=lambda blob: {0} if blob == image.layer_digests[0] else None)
        assert await finder.find(image.ref, image.manifest_digest) is None  # no entry left
        assert await finder.find(image.ref, "sha256:" + "0" * 64) is None  # an image without any


async def test_round_trip_through_the_referrers_api(registry, tmp_path: Path) -> None:
    front = ReferrersFront(registry.url)
    await front.start()
    try:
        image = await pushed(registry, tmp_path)
        image_ref = image.ref.replace(registry.address, front.address)
        profile = image_profile(image)
        async with RegistryClient(FAST) as client:
            assert await ProfileFinder(ProfileStore(tmp_path / "a"), client, deadline_s=10).publish(image_ref, profile)
            assert front.referrers[image.manifest_digest]
            tag = ImageReference.parse(image.ref).with_tag(referrers.fallback_tag(image.manifest_digest))
            with pytest.raises(RegistryNotFoundError):
                await client.get_manifest(tag)  # the registry indexed it: no fallback tag written
            found = await ProfileFinder(ProfileStore(tmp_path / "b"), client, deadline_s=10).find(
                image_ref, image.manifest_digest)
            assert found == profile
            assert any("/referrers/" in p for _, p, _ in front.requests)
    finally:
        await front.stop()


class ReferrersFront:
    """An aiohttp front of the real registry that implements the referrers API (newer registries do)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.referrers: dict[str, list[dict]] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.address = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, ""))
        _, sep, digest = request.path.rpartition("/referrers/")
        if sep and request.method == "GET":
            wanted = request.query.get("artifactType")
            found = [e for e in self.referrers.get(digest, []) if not wanted or e["artifactType"] == wanted]
            return web.Response(body=json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": found}),
                                content_type=mt.OCI_INDEX)
        body = await request.read()
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body or None, allow_redirects=False) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "connection")}
            if "Location" in out:
                out["Location"] = out["Location"].replace(self.upstream, f"http://{self.address}")
            if request.method == "PUT" and "/manifests/" in request.path and upstream.status == 201:
                doc = json.loads(body)
                if "subject" in doc:
                    self.referrers.setdefault(doc["subject"]["digest"], []).append(
                        {"mediaType": mt.OCI_MANIFEST, "digest": request.path.rsplit("/", 1)[1], "size": len(body),
                         "artifactType": doc["artifactType"], "annotations": doc["annotations"]})
                    out["OCI-Subject"] = doc["subject"]["digest"]
            response = web.Response(status=upstream.status, headers=out, body=payload)
            if request.method == "HEAD":
                response.headers["Content-Length"] = upstream.headers.get("Content-Length", "0")
            return response

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.address = await serve_local(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


class PullOnlyTokens(TokenServer):
    """Read-only credentials (once `read_only`): tokens grant pull, never push."""

    read_only = False

    def _token(self, scopes: list[str]) -> str:
        if self.read_only:
            scopes = [s.rsplit(":", 1)[0] + ":pull" for s in scopes]
        return super()._token(scopes)


async def test_read_only_credentials_keep_the_profile_local(tmp_path: Path, monkeypatch) -> None:
    tokens = await PullOnlyTokens(tmp_path / "tokens").start()
    try:
        with tokens.registry(tmp_path / "registry") as reg:
            monkeypatch.setenv("DOCKER_CONFIG", str(write_docker_config(tmp_path / "docker", reg.address, USER, PASSWORD)))
            image = await pushed(reg, tmp_path)
            tokens.read_only = True
            async with RegistryClient(FAST) as client:
                finder = ProfileFinder(ProfileStore(tmp_path / "a"), client, deadline_s=10)
                profile = image_profile(image)
                assert await finder.publish(image.ref, profile) is None
                asked = tokens.issued
                assert await finder.publish(image.ref, profile) is None  # refused once: not asked again
                assert tokens.issued == asked
                assert await client.get_referrers(ImageReference.parse(image.ref), image.manifest_digest) is None
    finally:
        await tokens.stop()


# ---- peers -----------------------------------------------------------------------------------


async def test_peer_route_serves_profiles_with_the_token_only(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "snap")
    profile = pf.StartupProfile(M, ((L1, 0), (L2, 4096)))
    store.save(profile)
    node = PeerNode(PeerConfig(cache_dir=str(tmp_path / "cache"), listen_host="127.0.0.1", listen_port=0,
                               token="t0ken", discovery="none"), FAST)
    node.profiles = lambda digest: asyncio.to_thread(store.read_bytes, digest)
    ready = asyncio.Event()
    task = asyncio.create_task(node.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        assert node.listener is not None
        address = f"127.0.0.1:{node.listener.port}"
        async with aiohttp.ClientSession() as session:
            url = f"http://{address}/v1/profiles/{M}"
            async with session.get(url) as resp:
                assert resp.status == 401
            async with session.get(url, headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401
            auth = {"Authorization": "Bearer t0ken"}
            async with session.get(url, headers=auth) as resp:
                assert resp.status == 200
                assert pf.decode(await resp.read(), M) == profile
            async with session.get(f"http://{address}/v1/profiles/{'sha256:' + 'c' * 64}", headers=auth) as resp:
                assert resp.status == 404
            async with session.get(f"http://{address}/v1/profiles/..%2fetc", headers=auth) as resp:
                assert resp.status in (400, 404)

            async with RegistryClient(FAST) as client:
                other = ProfileStore(tmp_path / "other")
                finder = ProfileFinder(other, client, deadline_s=10, peers=lambda: ["127.0.0.1:1", address],
                                       session=session, token="t0ken")
                assert await finder.find("127.0.0.1:9/never/asked:1", M) == profile  # from the peer, not the registry
                assert other.load(M) == profile
                no_token = ProfileFinder(ProfileStore(tmp_path / "third"), client, deadline_s=2,
                                         peers=lambda: [address], session=session)
                assert await no_token.find("127.0.0.1:9/never/asked:1", M) is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ---- the CLI ---------------------------------------------------------------------------------


async def test_profile_show_reads_the_profile_and_the_tocs(registry, tmp_path: Path, capsys) -> None:
    layout = build_small_layout(tmp_path / "layout", files=3, size=300_000)
    image = await push_seekable(layout, registry.address, "app/shown")
    async with RegistryClient(FAST) as client:
        fetched = await client.get_manifest(ImageReference.parse(image.ref))
    result = await asyncio.to_thread(peerpull_cmd, "profile", "show", image.ref)
    assert_one_line_error(result, 7, "no startup profile")

    desc = image.manifest["layers"][0]
    async with RegistryClient(FAST) as client:
        footer, frame = await read_toc_frame(
            RegistryBlobReader(client, ImageReference.parse(image.ref), desc["digest"], desc["size"]),
            location_from_annotations(desc["annotations"]))
        chunks = sorted({c.blob_offset: c for e in fmt.decode_toc(frame, footer).entries for c in e.chunks}.values(),
                        key=lambda c: c.blob_offset)
        reads = [(desc["digest"], c.blob_offset) for c in chunks[:2]] + [(desc["digest"], chunks[0].blob_offset + 1)]
        profile = pf.StartupProfile(fetched.digest, tuple(reads))
        assert await ProfileFinder(ProfileStore(tmp_path / "a"), client, deadline_s=10).publish(image.ref, profile)
    # in-process from here: the subprocess above covered the user's path, a second would only add start-up time
    assert await asyncio.to_thread(cli.main, ["--log-level", "warning", "profile", "show", image.ref, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["manifest_digest"] == fetched.digest
    assert (info["chunks"], info["stale"]) == (2, 1)
    assert info["bytes"] == chunks[0].compressed_length + chunks[1].compressed_length
    assert [layer["digest"] for layer in info["layers"]] == [desc["digest"]]
    assert await asyncio.to_thread(cli.main, ["--log-level", "warning", "profile", "show", image.ref]) == 0
    text = capsys.readouterr().out
    assert "2 chunks" in text and "1 stale" in text


async def test_recordings_under_way_are_kept_when_the_daemon_stops() -> None:
    done: list[pf.StartupProfile] = []

    async def on_done(ref: str, profile: pf.StartupProfile) -> None:
        done.append(profile)

    recorder = ProfileRecorder(quiet_s=600, max_s=600, max_chunks=100, on_done=on_done)
    recorder.start("r/img:1", M, [L1])
    recorder.start("r/other:1", "sha256:" + "b" * 64, [L2])  # nothing read: nothing kept
    recorder.observe(L1, chunk(4))
    await recorder.close()
    assert done == [pf.StartupProfile(M, ((L1, 4),))]


def test_a_recording_of_most_of_the_image_is_a_whole_image_share() -> None:
    sizes = {"sha256:" + "a" * 64: {0: 100, 100: 100, 200: 800}, "sha256:" + "b" * 64: {0: 1000}}
    a, b = sizes

    def frames(blob: str) -> dict[int, int] | None:
        return sizes.get(blob)

    startup = pf.StartupProfile(M, ((a, 0), (a, 100), (a, 0)))  # a repeat counts once
    image = [a, b]
    assert pf.share_of_layers(startup, image, frames) == pytest.approx(200 / 2000)  # every layer of the image counts
    assert pf.share_of_layers(startup, [], frames) == pytest.approx(0.2)  # unknown layer list: those it read
    scan = pf.StartupProfile(M, ((a, 0), (a, 200), (b, 0)))
    assert pf.share_of_layers(scan, image, frames) == pytest.approx(1900 / 2000)
    unmounted = pf.StartupProfile(M, (("sha256:" + "c" * 64, 0),))
    assert pf.share_of_layers(unmounted, image, frames) == 0.0
    # the daemon's default drops the scan and keeps the start-up
    limit = SnapshotterConfig().profile_max_share
    assert pf.share_of_layers(startup, image, frames) <= limit < pf.share_of_layers(scan, image, frames)
