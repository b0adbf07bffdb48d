"""kubelet's imagePullSecrets reach the daemon: CRI PullImage through the daemon's image-service proxy
(in front of a real containerd 1.6 with its CRI plugin) against an htpasswd registry, with a daemon
that has no docker config. The secret makes the layers lazy and readable; without it containerd
refuses (and a refused secret is dropped); the other image RPCs pass through; expired credentials fail a new read with one clear line
and the next pull renews them; the password is in no log and no file."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import peerpull_proto as proto
from peerpull.config import PeerpullConfig
from peerpull.doctor.check import DoctorContext
from peerpull.doctor.cri import check_cri
from peerpull.testbed.daemon import EmbeddedDaemon
from snapshotter.cri.config import CriConfig
from snapshotter.service.remote import LABEL_IMAGE_REF, LABEL_REMOTE
from tests.support import images
from tests.support.auth_registry import PASSWORD, USER, htpasswd_registry, write_docker_config
from tests.support.containerd import ContainerdProcess
from tests.support.lazy_stack import fuse_missing

pytestmark = [pytest.mark.root, pytest.mark.slow]

api = proto.load("cri.runtime.v1.api_pb2")
api_grpc = proto.load("cri.runtime.v1.api_pb2_grpc")
TTL_S = 40
SMALL = b"private bytes\n" * 5000
BIG = random.Random(13).randbytes(6 << 20)


def _peerpull(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _cri_config(address: str) -> str:
    """What `peerpull containerd-config` prints for the CRI plugin, plus plain HTTP to our registry."""
    printed = _peerpull("containerd-config").stdout
    return printed[printed.index('[plugins."io.containerd.grpc.v1.cri".containerd]'):] + (
        f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{address}"]\n'
        f'  endpoint = ["http://{address}"]\n')


def _run(ctrd: ContainerdProcess, image: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A container of a CRI-pulled image (namespace k8s.io) on the peerpull snapshotter."""
    cmd = ["ctr", "--address", str(ctrd.socket), "--namespace", "k8s.io", "run", "--rm", "--runc-root",
           str(ctrd.root / "runc"), "--snapshotter", "peerpull", image, f"cri-{uuid.uuid4().hex[:8]}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def _lazy_layers(daemon: EmbeddedDaemon, image: str) -> int:
    snap = proto.load("containerd.services.snapshots.v1.snapshots_pb2")
    snap_grpc = proto.load("containerd.services.snapshots.v1.snapshots_pb2_grpc")
    with grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        infos = [i for r in snap_grpc.SnapshotsStub(channel).List(snap.ListSnapshotsRequest(snapshotter="peerpull"))
                 for i in r.info]
    return sum(1 for i in infos if i.labels.get(LABEL_IMAGE_REF) == image and i.labels.get(LABEL_REMOTE))


class Kubelet:
    """The image-service calls kubelet makes, on the endpoint it was given."""

    def __init__(self, socket: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self.images = api_grpc.ImageServiceStub(self._channel)
        # the runtime service is not in our .proto: any method of it, as bytes
        self.runtime_version = self._channel.unary_unary("/runtime.v1.RuntimeService/Version")

    def pull(self, image: str, auth: Any = None) -> str:
        request = api.PullImageRequest(image=api.ImageSpec(image=image), auth=auth,
                                       sandbox_config=api.PodSandboxConfig())
        return str(self.images.PullImage(request, timeout=300).image_ref)

    def close(self) -> None:
        self._channel.close()


def _doctor(socket: Path, enabled: bool = True) -> list[dict[str, Any]]:
    config = PeerpullConfig(cri=CriConfig(image_proxy=enabled, socket=str(socket)))
    return [r.as_dict() for r in asyncio.run(check_cri(DoctorContext(config, Path("/nonexistent"))))]


def test_doctor_names_a_missing_proxy_socket_and_skips_when_off(tmp_path: Path) -> None:
    assert _doctor(tmp_path / "none.sock", enabled=False) == []
    [result] = _doctor(tmp_path / "none.sock")
    assert result["name"] == "cri_image_proxy" and not result["ok"] and "cri.image_proxy = true" in result["message"]


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {n!r}" for n in needles if n in data]
    return hits


@pytest.fixture()
def short_dirs() -> Iterator[Callable[[str], Path]]:
    """Directories under /run for sockets (a pytest tmp path is too long for one), removed after."""
    made: list[Path] = []

    def make(prefix: str) -> Path:
        made.append(Path(tempfile.mkdtemp(prefix=prefix, dir="/run")))
        return made[-1]
    yield make
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


def test_pull_secret_reaches_the_daemon(tmp_path: Path, short_dirs: Callable[[str], Path]) -> None:
    if reason := fuse_missing():
        pytest.skip(reason)
    with htpasswd_registry(tmp_path / "registry") as registry:
        address = registry.address
        layout = tmp_path / "layout"
        images.build_simple_image(layout, {"secret/small.txt": SMALL, "secret/big.bin": BIG})
        image = f"{address}/private/app:seekable"
        pusher = write_docker_config(tmp_path / "pusher", address, USER, PASSWORD) / "config.json"
        _peerpull("--docker-config", str(pusher), "convert", "--quiet", "--chunk-size", str(images.CHUNK),
                  f"oci:{layout}:latest", image)

        empty = tmp_path / "no-docker-config.json"
        empty.write_text(json.dumps({"auths": {}}))
        ctrd_dir = short_dirs("ppcri-")
        ctrd_socket = ctrd_dir / "containerd.sock"
        kubelet_dir = short_dirs("ppcri-k-")
        proxy_socket = kubelet_dir / "cri-image.sock"
        daemon = EmbeddedDaemon(tmp_path / "daemon", extra_env={
            "PEERPULL_REGISTRY_DOCKER_CONFIG": str(empty),
            "PEERPULL_CRI_IMAGE_PROXY": "true",
            "PEERPULL_CRI_SOCKET": str(proxy_socket),
            "PEERPULL_CRI_CONTAINERD_SOCKET": str(ctrd_socket),
            "PEERPULL_CRI_CREDENTIAL_TTL_S": str(TTL_S),
            # reads only what a container reads: nothing fetched ahead can hide an expired credential
            "PEERPULL_SNAPSHOTTER_PREFETCH": "none", "PEERPULL_SNAPSHOTTER_STREAM": "never",
            "PEERPULL_SNAPSHOTTER_PROFILE_RECORD": "false",
        })
        with daemon, ContainerdProcess(ctrd_dir, proxy_plugins={"peerpull": str(daemon.socket)}, enable_cri=True,
                                       extra_config=_cri_config(address)) as ctrd:
            assert ctrd.socket == ctrd_socket
            kubelet = Kubelet(proxy_socket)
            secret = api.AuthConfig(username=USER, password=PASSWORD)
            try:
                # no secret: containerd refuses, its error comes back as it was
                with pytest.raises(grpc.RpcError) as refused:
                    kubelet.pull(image)
                assert "401" in (refused.value.details() or "") or "authoriz" in (refused.value.details() or "").lower()

                image_id = kubelet.pull(image, secret)
                pulled_at = time.monotonic()
                assert image_id.startswith("sha256:")
                assert _lazy_layers(daemon, image) == 2  # busybox and the files: both lazy
                small = _run(ctrd, image, "/bin/busybox", "cat", "/secret/small.txt")
                assert small.returncode == 0 and small.stdout.encode() == SMALL, small.stderr

                # the other image RPCs pass through; the runtime service is not ours
                listed = kubelet.images.ListImages(api.ListImagesRequest(), timeout=30).images
                assert any(image in i.repo_tags for i in listed), listed
                status = kubelet.images.ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=image)), timeout=30)
                assert status.image.id == image_id
                assert kubelet.images.ImageFsInfo(api.ImageFsInfoRequest(), timeout=30).image_filesystems
                with pytest.raises(grpc.RpcError) as other:
                    kubelet.runtime_version(b"", timeout=30)
                assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED

                [doctor] = _doctor(proxy_socket)
                assert doctor["ok"] and "--image-service-endpoint" in doctor["message"], doctor

                metrics = daemon.metrics()
                assert metrics['peerpull_cri_requests_total{code="OK",method="PullImage"}'] == 1, metrics
                refused_pulls = [v for k, v in metrics.items()
                                 if k.startswith("peerpull_cri_requests_total{") and 'method="PullImage"' in k
                                 and 'code="OK"' not in k]
                assert refused_pulls == [1], metrics
                assert metrics['peerpull_cri_requests_total{code="OK",method="ListImages"}'] == 1
                assert metrics["peerpull_cri_credentials"] == 2  # the repository and its registry host

                # expired: a read of what is not local yet fails, and says why in one line
                time.sleep(max(0.0, pulled_at + TTL_S + 1 - time.monotonic()))
                late = _run(ctrd, image, "/bin/busybox", "sha256sum", "/secret/big.bin")
                assert late.returncode != 0, late.stdout
                assert len(daemon.events("registry_credentials_expired")) == 1, daemon.log_tail()
                failures = [e for e in daemon.events("chunk_fetch_failed") if "expired" in e.get("error", "")]
                assert failures and "the next pull of the image renews them" in failures[0]["error"], failures
                assert daemon.metrics()["peerpull_cri_credentials"] == 0

                # the next pull renews them
                assert kubelet.pull(image, api.AuthConfig(auth=base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())) \
                    == image_id
                big = _run(ctrd, image, "/bin/busybox", "sha256sum", "/secret/big.bin")
                assert big.returncode == 0 and big.stdout.split()[0] == hashlib.sha256(BIG).hexdigest(), big.stderr

                # a secret containerd refuses is dropped at once
                with pytest.raises(grpc.RpcError):
                    kubelet.pull(image, api.AuthConfig(username=USER, password="wrong-password"))
                assert len(daemon.events("registry_credentials_dropped")) == 1
                assert daemon.metrics()["peerpull_cri_credentials"] == 0

                kubelet.images.RemoveImage(api.RemoveImageRequest(image=api.ImageSpec(image=image)), timeout=60)
                gone = kubelet.images.ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=image)), timeout=30)
                assert not gone.HasField("image")
            finally:
                kubelet.close()
            logs = daemon.log_path.read_text() + Path(ctrd.log_path).read_text()
        secrets = [PASSWORD.encode(), base64.b64encode(f"{USER}:{PASSWORD}".encode())]
        assert not [s for s in secrets if s in logs.encode()]
        assert _files_containing(tmp_path / "daemon", secrets) == []  # the FUSE mount is gone by now
        assert _files_containing(kubelet_dir, secrets) == []
        assert not proxy_socket.exists()  # removed at the daemon's stop
