"""The node daemon as containerd's snapshotter, for real: registry, `peerpull daemon` (FUSE),
containerd + runc, `peerpull pull`, and CRI PullImage the way kubelet calls it."""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import time
from pathlib import Path

import grpc
import pytest

import peerpull_proto as proto
from snapshotter.fs.mount import mounted_at
from snapshotter.service.remote import LABEL_IMAGE_REF, LABEL_REMOTE
from tests.support import images
from tests.support.containerd import ContainerdProcess, pull_image, run_container
from tests.support.lazy_stack import LazyStack
from tests.support.tree import container_tree

pytestmark = [pytest.mark.root, pytest.mark.slow]

BIG = 32 << 20


@pytest.fixture(scope="module")
def corner(lazy_stack: LazyStack) -> dict[str, str]:
    layout = lazy_stack.root / "corner"
    images.build_corner_case_image(layout)
    source = images.push_layout(layout, lazy_stack.registry.address, "corner/original")
    target = f"{lazy_stack.registry.address}/corner/seekable:1"
    lazy_stack.convert(source, target, images.CHUNK)
    return {"source": source, "target": target}


@pytest.fixture(scope="module")
def app(lazy_stack: LazyStack) -> dict:
    """busybox, 300 small files of random sizes, and a 32 MiB "model" the entrypoint never reads."""
    rnd = random.Random(4)
    small = {f"app/m{i:03d}.py": rnd.randbytes(rnd.randint(0, 200_000)) for i in range(300)}
    code, model = images.LayerBuilder(), images.LayerBuilder()
    code.dir("app")
    for name, data in small.items():
        code.file(name, data)
    model.dir("model")
    big = rnd.randbytes(BIG)
    model.file("model/weights.bin", big)
    layout = lazy_stack.root / "app"
    images.write_oci_image(layout, [images.busybox_layer().tar_bytes(), code.tar_bytes(), model.tar_bytes()],
                           cmd=["/bin/busybox", "echo", "entrypoint started"])
    source = images.push_layout(layout, lazy_stack.registry.address, "app/original")
    target = f"{lazy_stack.registry.address}/app/seekable:1"
    lazy_stack.convert(source, target, images.CHUNK)
    hashes = {"/" + name: hashlib.sha256(data).hexdigest() for name, data in small.items()}
    hashes["/model/weights.bin"] = hashlib.sha256(big).hexdigest()
    total = BIG + sum(len(d) for d in small.values())
    return {"source": source, "target": target, "hashes": hashes, "bytes": total}


def _origin_bytes(stack: LazyStack) -> float:
    """Uncompressed chunk bytes the daemon has fetched from the registry so far."""
    return stack.daemon.metrics().get('peerpull_chunk_bytes_total{tier="origin"}', 0.0)


def test_converted_image_runs_lazily_with_the_same_tree_as_overlayfs(lazy_stack: LazyStack, corner: dict[str, str]) -> None:
    report = lazy_stack.pull(corner["target"])
    assert report["layers"] == 3 and report["lazy"] == 3 and report["downloaded"] == 0
    ctrd = lazy_stack.containerd
    assert run_container(ctrd, corner["target"], [], snapshotter="peerpull").strip() == images.ENTRYPOINT_OUTPUT
    lazy_tree = container_tree(ctrd, corner["target"], snapshotter="peerpull")
    pull_image(ctrd, corner["source"])
    plain_tree = container_tree(ctrd, corner["source"])
    assert len(lazy_tree) > 90
    assert {p for p in lazy_tree if lazy_tree[p] != plain_tree.get(p)} == set()
    assert lazy_tree == plain_tree
    for removed in images.REMOVED:
        assert removed not in lazy_tree
    # the lower directories are the layers in the FUSE mount: whiteouts and opaque dirs as overlayfs wants them
    mount = lazy_stack.daemon.fuse_mount
    layer_dirs = sorted(mount.iterdir())
    assert len(layer_dirs) >= 3
    whiteouts = [p for d in layer_dirs for p in d.rglob("*") if p.is_char_device() and os.stat(p, follow_symlinks=False).st_rdev == 0]
    opaque = [p for d in layer_dirs for p in d.rglob("*")
              if p.is_dir() and not p.is_symlink() and b"trusted.overlay.opaque" in [x.encode() for x in os.listxattr(p)]]
    assert whiteouts and opaque
    assert os.getxattr(opaque[0], "trusted.overlay.opaque") == b"y"


def test_a_format_v1_image_still_runs_lazily_with_the_same_tree(lazy_stack: LazyStack) -> None:
    """The default conversion writes format 2 (the tests around); layers converted before it still serve."""
    rnd = random.Random(10)
    layer = images.LayerBuilder()
    layer.dir("v1")
    for i in range(60):
        layer.file(f"v1/f{i:02d}", rnd.randbytes(rnd.choice([0, 100, 5000, 20_000, 70_000, 200_000])))
    layout = lazy_stack.root / "v1"
    # busybox on top: no layer chain shared with the other images, so each test sees its own snapshots
    images.write_oci_image(layout, [layer.tar_bytes(), images.busybox_layer().tar_bytes()],
                           cmd=["/bin/busybox", "echo", "v1 started"])
    source = images.push_layout(layout, lazy_stack.registry.address, "v1/original")
    target = f"{lazy_stack.registry.address}/v1/seekable:1"
    lazy_stack.convert(source, target, images.CHUNK, "--format-version", "1")
    report = lazy_stack.pull(target)
    assert report["layers"] == 2 and report["lazy"] == 2
    ctrd = lazy_stack.containerd
    assert run_container(ctrd, target, [], snapshotter="peerpull").strip() == "v1 started"
    lazy_tree = container_tree(ctrd, target, snapshotter="peerpull")
    pull_image(ctrd, source)
    assert len([p for p in lazy_tree if p.startswith("/v1/")]) == 60
    assert lazy_tree == container_tree(ctrd, source)


def test_entrypoint_starts_before_most_of_the_image_is_fetched(lazy_stack: LazyStack, app: dict) -> None:
    registry = lazy_stack.registry
    repo = "app/seekable"
    before = registry.blob_bytes(repo)
    origin_before = _origin_bytes(lazy_stack)
    report = lazy_stack.pull(app["target"])
    assert report["lazy"] == 3
    out = run_container(lazy_stack.containerd, app["target"], [], snapshotter="peerpull")
    assert out.strip() == "entrypoint started"
    fetched = registry.blob_bytes(repo) - before
    image_bytes = sum(d.stat().st_size for d in (lazy_stack.root / "app" / "blobs" / "sha256").iterdir())
    assert image_bytes > BIG
    # TOCs and the busybox binary; not the 32 MiB model, not the 300 files
    assert fetched < 0.15 * image_bytes, (fetched, image_bytes)
    # the chunks behind the container's start: busybox and its neighbours, nothing of /app or /model
    assert _origin_bytes(lazy_stack) - origin_before < 0.1 * app["bytes"]


def test_200_concurrent_readers_get_correct_bytes(lazy_stack: LazyStack, app: dict) -> None:
    lazy_stack.pull(app["target"])
    reads_before = lazy_stack.daemon.metrics().get("peerpull_fuse_reads_total", 0.0)
    rnd = random.Random(7)
    names = sorted(app["hashes"])
    picks = [rnd.choice(names) for _ in range(195)] + ["/model/weights.bin"] * 5
    script = ("i=0; for f in " + " ".join(shlex.quote(p) for p in picks) + "; do "
              "(/bin/busybox sha256sum \"$f\" > /tmp/r.$i) & i=$((i+1)); done; wait; /bin/busybox cat /tmp/r.*")
    out = run_container(lazy_stack.containerd, app["target"], ["/bin/busybox", "sh", "-c", script], snapshotter="peerpull")
    lines = [line.split() for line in out.strip().splitlines()]
    assert len(lines) == 200
    for digest, path in lines:
        assert digest == app["hashes"][path], path
    errors = lazy_stack.daemon.metrics()
    assert not any(k.startswith("peerpull_chunk_errors_total") and v > 0 for k, v in errors.items()), errors
    # every sha256sum read its file through the mount at least once: the FUSE read counter saw them
    assert errors["peerpull_fuse_reads_total"] - reads_before >= 200


def test_unconverted_image_works_through_peerpull(lazy_stack: LazyStack, app: dict) -> None:
    """Ordinary layers: `peerpull pull` downloads and unpacks them through containerd's applier;
    layers whose diff_id the node already has (the converted twin's) are shared, not fetched."""
    layout = lazy_stack.root / "plain"
    payload = random.Random(9).randbytes(3 << 20)
    images.build_simple_image(layout, {"data/blob.bin": payload})
    source = images.push_layout(layout, lazy_stack.registry.address, "plain/original")
    report = lazy_stack.pull(source)
    assert report["lazy"] == 0 and report["downloaded"] == 1 and report["already_present"] == 1, report
    out = run_container(lazy_stack.containerd, source, ["/bin/busybox", "sha256sum", "/data/blob.bin"],
                        snapshotter="peerpull")
    assert out.split()[0] == hashlib.sha256(payload).hexdigest()
    twin = lazy_stack.pull(app["source"])  # same diff_ids as the converted image pulled before
    assert twin["already_present"] == 3 and twin["downloaded"] == 0


def _cri_pull(socket: Path, image: str) -> str:
    api = proto.load("cri.runtime.v1.api_pb2")
    api_grpc = proto.load("cri.runtime.v1.api_pb2_grpc")
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = api_grpc.ImageServiceStub(channel)
        resp = stub.PullImage(api.PullImageRequest(image=api.ImageSpec(image=image),
                                                   sandbox_config=api.PodSandboxConfig()), timeout=300)
    return str(resp.image_ref)


def test_cri_pull_image_is_lazy(lazy_stack: LazyStack, app: dict) -> None:
    """containerd's CRI plugin set to our snapshotter with snapshot annotations, called like kubelet."""
    address = lazy_stack.registry.address
    # exactly what `peerpull containerd-config` prints, minus the proxy plugin the fixture adds
    printed = lazy_stack.peerpull("containerd-config").stdout
    cri = printed[printed.index('[plugins."io.containerd.grpc.v1.cri".containerd]'):] + (
        f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{address}"]\n'
        f'  endpoint = ["http://{address}"]\n'
    )
    assert 'snapshotter = "peerpull"' in cri and "disable_snapshot_annotations = false" in cri
    layout = lazy_stack.root / "cri"
    images.build_simple_image(layout, {"model/cri.bin": random.Random(11).randbytes(BIG // 2)})
    source = images.push_layout(layout, address, "cri/original")
    target = f"{address}/cri/seekable:1"
    lazy_stack.convert(source, target, images.CHUNK)
    before = lazy_stack.registry.blob_bytes("cri/seekable")
    with ContainerdProcess(lazy_stack.root / "containerd-cri", proxy_plugins={"peerpull": str(lazy_stack.daemon.socket)},
                           enable_cri=True, extra_config=cri) as ctrd:
        image_id = _cri_pull(ctrd.socket, target)
        assert image_id.startswith("sha256:")
    # the model layer is new to the node (busybox is shared with the images pulled before)
    lazy = [info for info in daemon_snapshots(lazy_stack) if info.labels.get(LABEL_IMAGE_REF) == target]
    assert len(lazy) == 1 and lazy[0].labels.get(LABEL_REMOTE), lazy
    fetched = lazy_stack.registry.blob_bytes("cri/seekable") - before
    assert fetched < 0.05 * BIG, fetched  # the TOC only: the CRI plugin downloaded no layer


def daemon_snapshots(stack: LazyStack) -> list:
    """The daemon's own list of snapshots, asked over its socket as containerd does."""
    snap = proto.load("containerd.services.snapshots.v1.snapshots_pb2")
    snap_grpc = proto.load("containerd.services.snapshots.v1.snapshots_pb2_grpc")
    with grpc.insecure_channel(f"unix://{stack.daemon.socket}") as channel:
        stub = snap_grpc.SnapshotsStub(channel)
        return [i for resp in stub.List(snap.ListSnapshotsRequest(snapshotter="peerpull")) for i in resp.info]


def _list_after_restart(ctrd: ContainerdProcess) -> str:
    """containerd re-dials a restarted proxy snapshotter with a backoff of up to 3 s: allow for it."""
    deadline = time.monotonic() + 15
    while True:
        result = ctrd.ctr("snapshots", "--snapshotter", "peerpull", "ls", check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, result.stderr
            return result.stdout
        time.sleep(0.5)


def test_daemon_restart_keeps_snapshots_and_cleans_stale_mounts(lazy_stack: LazyStack, app: dict) -> None:
    daemon, ctrd = lazy_stack.daemon, lazy_stack.containerd
    lazy_stack.pull(app["target"])
    listed_before = ctrd.ctr("snapshots", "--snapshotter", "peerpull", "ls").stdout
    # clean stop: SIGTERM unmounts
    assert daemon.stop() == 0
    assert mounted_at(daemon.fuse_mount) is None
    daemon.start()
    assert _list_after_restart(ctrd) == listed_before
    out = run_container(ctrd, app["target"], ["/bin/busybox", "sha256sum", "/app/m150.py"], snapshotter="peerpull")
    assert out.split()[0] == app["hashes"]["/app/m150.py"]
    # crash: the FUSE mount is left behind, dead; the next start detaches it and serves again
    daemon.stop(kill=True)
    assert mounted_at(daemon.fuse_mount) == "fuse.peerpull"
    with pytest.raises(OSError):
        os.listdir(daemon.fuse_mount)
    daemon.start()
    assert "stale_mount_removed" in daemon.log_tail(20000)
    assert _list_after_restart(ctrd) == listed_before
    out = run_container(ctrd, app["target"], ["/bin/busybox", "sha256sum", "/model/weights.bin"], snapshotter="peerpull")
    assert out.split()[0] == app["hashes"]["/model/weights.bin"]


def test_daemon_says_when_containerd_is_missing(tmp_path: Path) -> None:
    from peerpull.testbed.daemon import EmbeddedDaemon
    from tests.support.lazy_stack import fuse_missing

    if reason := fuse_missing():
        pytest.skip(reason)
    env = {"PEERPULL_SNAPSHOTTER_CONTAINERD_ADDRESS": str(tmp_path / "no-containerd.sock")}
    with EmbeddedDaemon(tmp_path / "daemon", extra_env=env) as daemon:
        log = daemon.log_tail(20000)
    assert '"containerd_not_found"' in log and "peerpull containerd-config" in log


def test_a_container_start_records_a_startup_profile_and_pushes_it(lazy_stack: LazyStack) -> None:
    """Default settings: the first reads after a container starts become the image's profile, on
    the node's disk and, as an artifact referring to the manifest, in the registry."""
    import json
    import urllib.request

    from converter.registry import media_types as mt
    from converter.registry.referrers import fallback_tag
    from snapshotter.service import profiles as pf
    from tests.support.waiting import wait_until

    rnd = random.Random(9)
    code = images.LayerBuilder()
    code.dir("srv")
    for i in range(40):
        code.file(f"srv/f{i:02d}", rnd.randbytes(rnd.randint(1000, 150_000)))
    layout = lazy_stack.root / "profiled"
    images.write_oci_image(layout, [images.busybox_layer().tar_bytes(), code.tar_bytes()],
                           cmd=["/bin/busybox", "sha256sum", "/srv/f03", "/srv/f17"])
    source = images.push_layout(layout, lazy_stack.registry.address, "profiled/original")
    target = f"{lazy_stack.registry.address}/profiled/seekable:1"
    lazy_stack.convert(source, target, images.CHUNK)
    report = lazy_stack.pull(target)
    assert report["lazy"] + report["already_present"] == 2 and report["downloaded"] == 0  # busybox: maybe shared
    run_container(lazy_stack.containerd, target, [], snapshotter="peerpull")

    def get(path: str, accept: str) -> bytes:
        request = urllib.request.Request(f"{lazy_stack.registry.url}/v2/profiled/seekable/{path}",
                                         headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return bytes(resp.read())

    body = get("manifests/1", mt.OCI_MANIFEST)
    manifest, digest = json.loads(body), "sha256:" + hashlib.sha256(body).hexdigest()
    layers = [d["digest"] for d in manifest["layers"]]
    stored = lazy_stack.daemon.root / "snapshotter" / "profiles" / f"{digest[7:]}.json"
    wait_until(stored.exists, 120, "the startup profile on the node's disk")
    profile = pf.decode(stored.read_bytes(), digest)
    # the two files of the code layer (busybox itself may be in the page cache from other containers)
    assert layers[1] in profile.layers and set(profile.layers) <= set(layers)
    assert len([blob for blob, _ in profile.reads if blob == layers[1]]) >= 2

    def pushed() -> bool:
        try:
            index = json.loads(get(f"manifests/{fallback_tag(digest)}", mt.OCI_INDEX))
        except OSError:
            return False
        return any(e.get("artifactType") == pf.PROFILE_MEDIA_TYPE for e in index["manifests"])

    wait_until(pushed, 60, "the profile artifact in the registry")
