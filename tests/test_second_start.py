"""A second start of an image on the same node sends nothing to the registry, and no frame comes
from the registry twice (issue 10): a real daemon (FUSE), containerd + runc, and a counting proxy
in front of the registry. The first container reads a working set with many concurrent readers
while the image streams in (`auto` with a low threshold, and `always`); the page cache is dropped;
a second container of the same image reads the same set; then the daemon restarts on the same
root and a third container reads it once more. Each layer's TOC is read once per node, in one
Range request (the manifest gives its place and the blob's size)."""

from __future__ import annotations

import asyncio
import json
import random
import shlex
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from converter.format import toc as fmt
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from peer.chunk import ChunkRef
from peer.warm import image_chunks
from peerpull.testbed.daemon import EmbeddedDaemon
from peerpull.testbed.registry import EmbeddedRegistry
from tests.support import images
from tests.support.cli import peerpull_cmd
from tests.support.containerd import NAMESPACE, ContainerdProcess, run_container
from tests.support.fault_proxy import FaultProxy
from tests.support.lazy_stack import fuse_missing
from tests.test_stream import blob_ranges

pytestmark = [pytest.mark.root, pytest.mark.slow]

FILES = 400
MEDIUM = 6  # files of a few MiB: several chunks each, read while the rest streams


@dataclass
class Image:
    target: str  # in the registry (the proxy's address is put in front by the test)
    names: list[str]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRegistry]:
    if reason := fuse_missing():
        pytest.skip(reason)
    with EmbeddedRegistry(tmp_path_factory.mktemp("second-start") / "registry") as reg:
        yield reg


@pytest.fixture(scope="module")
def image(registry: EmbeddedRegistry, tmp_path_factory: pytest.TempPathFactory) -> Image:
    rnd = random.Random(10)
    files = {f"app/pkg{i % 20:02d}/m{i:03d}.py": rnd.randbytes(rnd.choice([300, 4000, 30_000, 90_000, 200_000]))
             for i in range(FILES)}
    files |= {f"app/lib/big{i}.so": rnd.randbytes((2 + i) << 20) for i in range(MEDIUM)}
    layout = tmp_path_factory.mktemp("second-start-image") / "layout"
    images.build_simple_image(layout, files, cmd=["/bin/busybox", "true"])
    target = f"{registry.address}/second/app:1"
    assert peerpull_cmd("convert", "--quiet", "--chunk-size", str(images.CHUNK), f"oci:{layout}:latest", target,
                        timeout=600).returncode == 0
    return Image(target, sorted(files))


def _script(names: list[str]) -> str:
    """Every file of the working set read by one of 16 concurrent readers (each a shell loop)."""
    groups = [names[i::16] for i in range(16)]
    loops = [f"(for f in {' '.join(shlex.quote('/' + n) for n in g)}; do /bin/busybox cat \"$f\"; done "
             f"| /bin/busybox md5sum > /tmp/r{i}) &" for i, g in enumerate(groups)]
    return " ".join(loops) + " wait; /bin/busybox cat /tmp/r*"


def _drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _frames_fetched(proxy: FaultProxy, refs: list[ChunkRef], since: int = 0) -> Counter[tuple[str, int]]:
    """How many Range requests after `since` covered each frame, by (blob, offset)."""
    by_blob: dict[str, list[tuple[int, int]]] = {}
    for blob, lo, hi in blob_ranges(proxy, since):
        by_blob.setdefault(blob, []).append((lo, hi))
    counts: Counter[tuple[str, int]] = Counter()
    for ref in refs:
        for lo, hi in by_blob.get(ref.blob, ()):
            if lo < ref.blob_offset + ref.compressed_length and ref.blob_offset < hi:
                counts[(ref.blob, ref.blob_offset)] += 1
    return counts


def _blob_requests(proxy: FaultProxy, since: int) -> list[tuple[str, str, str]]:
    return [r for r in proxy.requests[since:] if "/blobs/" in r[1]]


@pytest.mark.parametrize("stream", ["auto", "always"])
async def test_a_second_start_and_a_restart_send_nothing_to_the_registry(registry: EmbeddedRegistry, image: Image,
                                                                        tmp_path: Path, stream: str) -> None:
    proxy = await FaultProxy(registry.url).start()
    target = image.target.replace(registry.address, proxy.address)
    env = {"PEERPULL_SNAPSHOTTER_STREAM": stream,
           # the rest of the image streams while the first container still reads (auto)
           "PEERPULL_SNAPSHOTTER_STREAM_AFTER_BYTES": str(2 << 20),
           # less than the working set: the second start reads through the disk cache, not memory
           "PEERPULL_SNAPSHOTTER_MEMORY_CACHE_BYTES": str(16 << 20)}
    daemon = EmbeddedDaemon(tmp_path / "daemon", extra_env=env)
    try:
        async with RegistryClient(RegistryConfig()) as client:  # straight from the registry: not counted
            refs, _ = await image_chunks(client, image.target)
            fetched, _ = await client.resolve_image(ImageReference.parse(image.target))
            layers = json.loads(fetched.body)["layers"]
        await asyncio.to_thread(daemon.start)
        with ContainerdProcess(tmp_path / "containerd", proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
            pulled = await asyncio.to_thread(
                peerpull_cmd, "pull", target, "--address", str(ctrd.socket), "--namespace", NAMESPACE, "--json")
            assert pulled.returncode == 0, pulled.stderr[-2000:] + daemon.log_tail()
            script = ["/bin/busybox", "sh", "-c", _script(image.names)]

            async def run() -> str:
                _drop_page_cache()
                return await asyncio.to_thread(run_container, ctrd, target, script, snapshotter="peerpull")

            first = await run()
            assert len(first.split()) == 32  # 16 readers: a digest and "-" each
            # the streams of the first start end (the node has what it fetched) before the second
            # start is counted
            await _streams_done(daemon)
            before = len(proxy.requests)
            assert await run() == first
            assert _blob_requests(proxy, before) == [], daemon.log_tail()
            twice = {k: n for k, n in _frames_fetched(proxy, refs).items() if n > 1}
            assert twice == {}, f"{len(twice)} frames fetched more than once; ranges: {blob_ranges(proxy)}"
            assert daemon.events("cache_entry_corrupt") == []

            await asyncio.to_thread(daemon.stop)  # a restart on the same root: layers and chunks from disk
            await asyncio.to_thread(daemon.start)
            await _reconnected(ctrd)
            before = len(proxy.requests)
            assert await run() == first
            assert _blob_requests(proxy, before) == [], daemon.log_tail()
        # each layer's TOC came once, footer included, in one Range request and without a HEAD;
        # the restarted daemon read it from its disk
        assert not [r for r in proxy.requests if r[0] == "HEAD" and "/blobs/" in r[1]]
        for desc in layers:
            toc_offset = int(desc["annotations"][fmt.ANNOTATION_TOC_OFFSET])
            reads = [(lo, hi) for blob, lo, hi in blob_ranges(proxy) if blob == desc["digest"] and hi > toc_offset]
            assert reads == [(toc_offset, desc["size"])]
    finally:
        await asyncio.to_thread(daemon.close)
        await proxy.stop()


async def _streams_done(daemon: EmbeddedDaemon, timeout_s: float = 120) -> None:
    """Until every stream the daemon started has ended and no store is pending."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        started = len(daemon.events("stream_started"))
        if started == len(daemon.events("stream_done")):
            await asyncio.sleep(1.0)  # verification and the disk store follow the last answer
            if started == len(daemon.events("stream_started")) == len(daemon.events("stream_done")):
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"streams still running after {timeout_s} s: {daemon.log_tail()}")


async def _reconnected(ctrd: ContainerdProcess, timeout_s: float = 60) -> None:
    """Until containerd's proxy plugin talks to the restarted daemon (its gRPC client backs off)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        listed = await asyncio.to_thread(ctrd.ctr, "snapshots", "--snapshotter", "peerpull", "ls", check=False)
        if listed.returncode == 0:
            return
        await asyncio.sleep(0.5)
    raise AssertionError("containerd did not reconnect to the restarted daemon")


def _registry_requests(proxy: FaultProxy, since: int) -> list[tuple[str, str, str]]:
    """Blob and manifest requests after `since` (what a node already holding the content must not send)."""
    return [r for r in proxy.requests[since:] if "/blobs/" in r[1] or "/manifests/" in r[1]]


@pytest.mark.parametrize(("by", "files"), [("digest", FILES + MEDIUM), ("tag", FILES + MEDIUM), ("digest", 20)])
async def test_a_second_pull_and_start_after_a_restart_sends_nothing(registry: EmbeddedRegistry, image: Image,
                                                                     tmp_path: Path, by: str, files: int) -> None:
    """The whole second start, pull included, after a daemon restart: manifest, config, TOCs and chunks are local (containerd's
    content store, the daemon's root), so by digest not one manifest or blob request goes out; by tag
    one manifest HEAD asks where the tag points now (it may have moved), and nothing else. A start
    that reads a few files leaves a startup profile, which the restarted daemon finds locally (and
    checks against the image's layers, from the manifest it keeps on disk)."""
    proxy = await FaultProxy(registry.url).start()
    env = {"PEERPULL_SNAPSHOTTER_MEMORY_CACHE_BYTES": str(16 << 20), "PEERPULL_SNAPSHOTTER_PROFILE_QUIET_S": "1"}
    daemon = EmbeddedDaemon(tmp_path / "daemon", extra_env=env)
    try:
        async with RegistryClient(RegistryConfig()) as client:  # straight from the registry: not counted
            fetched, _ = await client.resolve_image(ImageReference.parse(image.target))
        repo = image.target.replace(registry.address, proxy.address).rsplit(":", 1)[0]
        target = f"{repo}@{fetched.digest}" if by == "digest" else image.target.replace(registry.address, proxy.address)
        await asyncio.to_thread(daemon.start)
        with ContainerdProcess(tmp_path / "containerd", proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
            script = ["/bin/busybox", "sh", "-c", _script(image.names[-files:])]

            async def start() -> str:
                pulled = await asyncio.to_thread(
                    peerpull_cmd, "pull", target, "--address", str(ctrd.socket), "--namespace", NAMESPACE, "--json")
                assert pulled.returncode == 0, pulled.stderr[-2000:] + daemon.log_tail()
                _drop_page_cache()
                return await asyncio.to_thread(run_container, ctrd, target, script, snapshotter="peerpull")

            first = await start()
            await _streams_done(daemon)
            if files < FILES:  # the profile is recorded once the container has been quiet a moment
                await _until(lambda: _profile_ends(daemon))
            await asyncio.to_thread(daemon.stop)
            await asyncio.to_thread(daemon.start)
            await _reconnected(ctrd)
            before = len(proxy.requests)
            assert await start() == first
            if files < FILES:  # the restarted daemon records the start again and checks it against the layers
                await _until(lambda: len(_profile_ends(daemon)) > 1)
            sent = _registry_requests(proxy, before)
            if by == "tag":
                assert sent[:1] == [("HEAD", "/v2/second/app/manifests/1", "")], sent
                sent = sent[1:]
            assert sent == [], daemon.log_tail()
    finally:
        await asyncio.to_thread(daemon.close)
        await proxy.stop()


async def _until(check: Callable[[], object], timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.2)


def _profile_ends(daemon: EmbeddedDaemon) -> list[dict[str, object]]:
    return [*daemon.events("profile_saved"), *daemon.events("profile_kept"), *daemon.events("profile_dropped")]


async def test_a_second_peerpull_run_on_the_same_node_sends_nothing(registry: EmbeddedRegistry, image: Image,
                                                                     tmp_path: Path) -> None:
    """`peerpull run` reads the image's layers, entrypoint and command before it pulls: on a node that
    holds the image they come from containerd's content store, so a second run by digest sends not
    one manifest or blob request (before, the config blob came from the registry on every run)."""
    proxy = await FaultProxy(registry.url).start()
    daemon = EmbeddedDaemon(tmp_path / "daemon")
    try:
        async with RegistryClient(RegistryConfig()) as client:  # straight from the registry: not counted
            fetched, _ = await client.resolve_image(ImageReference.parse(image.target))
        repo = image.target.replace(registry.address, proxy.address).rsplit(":", 1)[0]
        target = f"{repo}@{fetched.digest}"
        await asyncio.to_thread(daemon.start)
        with ContainerdProcess(tmp_path / "containerd", proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:

            async def run() -> None:
                ran = await asyncio.to_thread(
                    peerpull_cmd, "run", "--address", str(ctrd.socket), "--namespace", NAMESPACE, "--rm",
                    "--daemon-metrics", f"http://{daemon.peer_address}/metrics", target, "--",
                    "/bin/busybox", "md5sum", "/" + image.names[-1], timeout=300)
                assert ran.returncode == 0, ran.stderr[-2000:] + daemon.log_tail()

            await run()
            await _streams_done(daemon)
            before = len(proxy.requests)
            await run()
            assert _registry_requests(proxy, before) == [], daemon.log_tail()
    finally:
        await asyncio.to_thread(daemon.close)
        await proxy.stop()
