"""The containerd wiring, run for real on containerd 1.7 and 2.x (issue 13 items 1 and 6).

Each test starts a private containerd of that release (its binaries from
scripts/containerd_versions.sh: own root, state and sockets) wired exactly as
`peerpull containerd-config` prints it, against a private `peerpull daemon` and registry:
doctor says healthy; a CRI PullImage (as kubelet calls it) downloads no layer and a container reads
a file; `peerpull pull` + `ctr run`; a RuntimeClass handler is lazy for its pods only; k3s's
template loads and pulls lazily; each mis-wiring doctor knows is named on that release.

Opt-in (slow, needs the releases unpacked): collected only with PEERPULL_CONTAINERD_VERSIONS=1,
see tests/conftest.py. `PEERPULL_CONTAINERD_CACHE` overrides /var/cache/peerpull-containerd.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import peerpull_proto as proto
from peerpull import containerd_snippets
from peerpull.config import load_config
from peerpull.containerd_snippets import RUNTIME_HANDLER_ANNOTATION, Wiring
from peerpull.doctor.check import DoctorContext
from peerpull.doctor.containerd import check_containerd
from peerpull.testbed.daemon import EmbeddedDaemon
from peerpull.testbed.registry import EmbeddedRegistry
from tests.support import images
from tests.support.containerd import NAMESPACE, ContainerdProcess, run_container
from tests.support.lazy_stack import fuse_missing

pytestmark = [pytest.mark.root, pytest.mark.slow]

RELEASES = ["1.7.24", "2.1.9"]
CRI_NAMESPACE = "k8s.io"
BIG = 8 << 20  # the layer a lazy pull must not download
REPO = Path(__file__).resolve().parent.parent


def _bin_dir(release: str) -> Path:
    cache = Path(os.environ.get("PEERPULL_CONTAINERD_CACHE", "/var/cache/peerpull-containerd"))
    if not (cache / release / "bin" / "containerd").exists():  # fetch it (a no-op when present)
        subprocess.run(["bash", str(REPO / "scripts" / "containerd_versions.sh")], check=True, timeout=900,
                       env={**os.environ, "PEERPULL_CONTAINERD_CACHE": str(cache)}, capture_output=True)
    return cache / release / "bin"


def _series(release: str) -> str:
    """The snippets' name of the release: "1.7" or "2"."""
    return "2" if release.startswith("2.") else ".".join(release.split(".")[:2])


@dataclass
class Image:
    ref: str
    repo: str
    path: str      # a file in it and its content, for a container to read
    content: str


@dataclass
class Node:
    release: str
    root: Path
    registry: EmbeddedRegistry
    daemon: EmbeddedDaemon
    containerd: ContainerdProcess

    @property
    def config(self) -> Path:
        return self.containerd.root / "config.toml"

    def env(self) -> dict[str, str]:
        d = self.daemon
        return {**os.environ, "PEERPULL_SNAPSHOTTER_SOCKET": str(d.socket),
                "PEERPULL_SNAPSHOTTER_ROOT": str(d.root / "snapshotter"),
                "PEERPULL_PEER_CACHE_DIR": str(d.root / "cache"), "PEERPULL_PEER_LISTEN_HOST": "127.0.0.1",
                "PEERPULL_PEER_LISTEN_PORT": str(d.port), "PEERPULL_PEER_DISCOVERY": "none",
                "PEERPULL_SNAPSHOTTER_CONTAINERD_ADDRESS": str(self.containerd.socket)}

    def peerpull(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", *args], capture_output=True,
                              text=True, timeout=600, env=self.env(), stdin=subprocess.DEVNULL)

    def cri_pull(self, image: Image, runtime_handler: str = "") -> str:
        """CRI ImageService.PullImage as kubelet sends it: the pod's annotations (where the documented
        io.containerd.cri.runtime-handler is) in the sandbox config; ImageSpec.runtime_handler left empty,
        as kubelet's RuntimeClassInImageCriApi gate (alpha, off by default) leaves it."""
        api = proto.load("cri.runtime.v1.api_pb2")
        api_grpc = proto.load("cri.runtime.v1.api_pb2_grpc")
        annotations = {RUNTIME_HANDLER_ANNOTATION: runtime_handler} if runtime_handler else {}
        request = api.PullImageRequest(image=api.ImageSpec(image=image.ref),
                                       sandbox_config=api.PodSandboxConfig(annotations=annotations))
        with grpc.insecure_channel(f"unix://{self.containerd.socket}") as channel:
            return str(api_grpc.ImageServiceStub(channel).PullImage(request, timeout=300).image_ref)

    def ctr(self, namespace: str, *args: str) -> str:
        result = subprocess.run([self.containerd.tool("ctr"), "--address", str(self.containerd.socket),
                                 "--namespace", namespace, *args], capture_output=True, text=True, timeout=300,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stderr[-2000:]}"
        return result.stdout

    def read_in_container(self, namespace: str, image: Image, snapshotter: str) -> str:
        """`ctr run` a container of the image on `snapshotter` that prints the image's file."""
        return self.ctr(namespace, "run", "--rm", "--runc-root", str(self.containerd.root / "runc"),
                        "--snapshotter", snapshotter, image.ref, f"pp-{uuid.uuid4().hex[:10]}",
                        "/bin/busybox", "cat", image.path)

    def snapshot_parents(self, namespace: str, snapshotter: str) -> list[str]:
        return self.ctr(namespace, "snapshots", "--snapshotter", snapshotter, "ls").splitlines()[1:]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRegistry]:
    if reason := fuse_missing():
        pytest.skip(reason)
    with EmbeddedRegistry(tmp_path_factory.mktemp("versions-registry") / "registry") as reg:
        yield reg


_image_ids = iter(range(1000))


def _make_image(registry: EmbeddedRegistry, root: Path) -> Image:
    """busybox, a small file to read and a big one nobody reads: converted to the seekable format."""
    n = next(_image_ids)
    data = images.LayerBuilder()
    data.dir("data")
    data.file("data/hello.txt", f"hello from image {n}\n".encode())
    data.file("data/big.bin", random.Random(n).randbytes(BIG))
    layout = root / f"image-{n}"
    images.write_oci_image(layout, [images.busybox_layer().tar_bytes(), data.tar_bytes()],
                           cmd=["/bin/busybox", "cat", "/data/hello.txt"])
    source = images.push_layout(layout, registry.address, f"v{n}/original")
    repo = f"v{n}/seekable"
    target = f"{registry.address}/{repo}:1"
    subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "convert", "--quiet", source, target,
                    "--chunk-size", str(images.CHUNK)], check=True, capture_output=True, timeout=600)
    return Image(target, repo, "/data/hello.txt", f"hello from image {n}\n")


def _hosts(root: Path, registry: EmbeddedRegistry) -> Path:
    """A certs.d directory that reaches the test registry over plain HTTP (CRI's registry.config_path)."""
    hosts = root / "certs.d"
    (hosts / registry.address).mkdir(parents=True, exist_ok=True)
    (hosts / registry.address / "hosts.toml").write_text(
        f'server = "http://{registry.address}"\n[host."http://{registry.address}"]\n'
        '  capabilities = ["pull", "resolve"]\n')
    return hosts


def _registry_table(series: str, hosts: Path) -> str:
    table = 'plugins."io.containerd.cri.v1.images".registry' if series == "2" else \
        'plugins."io.containerd.grpc.v1.cri".registry'
    return f'\n[{table}]\n  config_path = "{hosts}"\n'


def _start(release: str, root: Path, registry: EmbeddedRegistry, wiring_text: str | None = None,
           **wiring: object) -> Node:
    """A daemon and a containerd of `release` whose config.toml is our header plus what peerpull prints."""
    daemon = EmbeddedDaemon(root / "daemon").start()
    try:
        series = _series(release)
        w = Wiring(containerd=series, socket=str(daemon.socket), **wiring)  # type: ignore[arg-type]
        text = wiring_text.replace("@SOCKET@", str(daemon.socket)) if wiring_text is not None else \
            containerd_snippets.snippet(w) + _registry_table(series, _hosts(root, registry))
        ctrd = ContainerdProcess(root / "containerd", enable_cri=True, extra_config="\n" + text,
                                 bin_dir=_bin_dir(release), config_version=3 if series == "2" else 2).start()
    except BaseException:
        daemon.stop()
        raise
    node = Node(release, root, registry, daemon, ctrd)
    assert release.split(".")[:2] == _reported_version(node).split(".")[:2]
    return node


def _reported_version(node: Node) -> str:
    out = node.ctr(NAMESPACE, "version")
    server = out[out.index("Server:"):]
    return re.search(r"Version:\s+v?([0-9.]+)", server).group(1)  # type: ignore[union-attr]


def _stop(node: Node) -> None:
    try:
        node.containerd.stop()
    finally:
        node.daemon.stop()


@pytest.fixture(params=RELEASES)
def release(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _doctor(node: Node) -> dict:
    result = node.peerpull("doctor", "--json", "--containerd-config", str(node.config))
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    report = json.loads(result.stdout)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert result.returncode == 0 and report["healthy"] and not failed, failed
    return {c["name"]: c for c in report["checks"]}


def _assert_lazy(node: Node, image: Image, before: int) -> None:
    fetched = node.registry.blob_bytes(image.repo) - before
    assert fetched < BIG // 10, f"{fetched} bytes of blobs fetched: a layer was downloaded"


def test_default_wiring_doctor_healthy_cri_pull_lazy_and_peerpull_pull(release: str, registry: EmbeddedRegistry,
                                                                      tmp_path: Path) -> None:
    node = _start(release, tmp_path, registry)
    try:
        checks = _doctor(node)
        assert f"containerd {release.split('.')[0]}." in checks["containerd_socket"]["message"]
        image = _make_image(registry, tmp_path)
        before = node.registry.blob_bytes(image.repo)
        assert node.cri_pull(image).startswith("sha256:")
        _assert_lazy(node, image, before)
        assert node.snapshot_parents(CRI_NAMESPACE, "peerpull")  # unpacked into peerpull's snapshots
        assert node.read_in_container(CRI_NAMESPACE, image, "peerpull") == image.content
        # `peerpull pull` + `ctr run` on the same containerd, another image
        other = _make_image(registry, tmp_path)
        before = node.registry.blob_bytes(other.repo)
        pulled = node.peerpull("pull", other.ref, "--address", str(node.containerd.socket), "--namespace", NAMESPACE,
                               "--json")
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        report = json.loads(pulled.stdout)
        assert report["lazy"] >= 1, report
        _assert_lazy(node, other, before)
        assert run_container(node.containerd, other.ref, ["/bin/busybox", "cat", other.path],
                             snapshotter="peerpull") == other.content
    finally:
        _stop(node)


def test_runtime_class_is_lazy_for_its_pods_only(release: str, registry: EmbeddedRegistry, tmp_path: Path) -> None:
    # a node's file that declares no runc of its own: the complete form (`--default-runtime`)
    node = _start(release, tmp_path, registry, runtime_class="lazy", default_runtime=True)
    try:
        checks = _doctor(node)
        assert "runtime handler lazy" in checks["containerd_cri_snapshotter"]["message"]
        pod, system = _make_image(registry, tmp_path), _make_image(registry, tmp_path)
        before = node.registry.blob_bytes(pod.repo)
        node.cri_pull(pod, runtime_handler="lazy")
        _assert_lazy(node, pod, before)
        assert node.read_in_container(CRI_NAMESPACE, pod, "peerpull") == pod.content
        # a pod without the runtime class: containerd's default snapshotter, the layers downloaded whole
        lazy_snapshots = set(node.snapshot_parents(CRI_NAMESPACE, "peerpull"))
        before = node.registry.blob_bytes(system.repo)
        node.cri_pull(system)
        assert node.registry.blob_bytes(system.repo) - before > BIG
        assert set(node.snapshot_parents(CRI_NAMESPACE, "peerpull")) == lazy_snapshots
        assert node.read_in_container(CRI_NAMESPACE, system, "overlayfs") == system.content
    finally:
        _stop(node)


def _k3s_filled(template: str, root: Path, hosts: Path) -> str:
    """k3s's template fields filled in as k3s would for this node, minus the header our helper writes."""
    values = {"NodeConfig.Containerd.Opt": str(root / "opt"), "NodeConfig.SELinux": "false",
              "NodeConfig.AgentConfig.PauseImage": "registry.invalid/pause:3.9",
              "NodeConfig.Containerd.Registry": str(hosts), "NodeConfig.AgentConfig.CNIBinDir": str(root / "cni-bin"),
              "NodeConfig.AgentConfig.CNIConfDir": str(root / "cni-conf"), "SystemdCgroup": "false"}
    filled = re.sub(r"\{\{ \.([A-Za-z.]+) \}\}", lambda m: values[m.group(1)], template)
    assert "{{" not in filled
    return "\n".join(line for line in filled.splitlines() if not line.startswith("version = "))


@pytest.mark.parametrize("runtime_class", ["", "lazy"])
def test_k3s_template_loads_and_pulls_lazily(release: str, runtime_class: str, registry: EmbeddedRegistry,
                                             tmp_path: Path) -> None:
    template = containerd_snippets.k3s_template(Wiring(containerd=_series(release), socket="@SOCKET@",
                                                       runtime_class=runtime_class))
    node = _start(release, tmp_path, registry, wiring_text=_k3s_filled(template, tmp_path, _hosts(tmp_path, registry)))
    try:
        _doctor(node)
        image = _make_image(registry, tmp_path)
        before = node.registry.blob_bytes(image.repo)
        node.cri_pull(image, runtime_handler=runtime_class)
        _assert_lazy(node, image, before)
        assert node.read_in_container(CRI_NAMESPACE, image, "peerpull") == image.content
        if runtime_class:  # k3s's own pods: the default snapshotter
            system = _make_image(registry, tmp_path)
            before = node.registry.blob_bytes(system.repo)
            node.cri_pull(system)
            assert node.registry.blob_bytes(system.repo) - before > BIG
    finally:
        _stop(node)


def _miswirings(series: str) -> dict[str, tuple[str, str]]:
    """check name → (what to replace in the printed wiring, by what), each one mis-wiring doctor knows."""
    out = {
        "containerd_proxy_plugin": ('address = "@SOCKET@"', 'address = "/run/elsewhere.sock"'),
        "containerd_cri_snapshotter": ('  snapshotter = "peerpull"\n  # pass', "  # pass"),
        "containerd_cri_annotations": ("disable_snapshot_annotations = false", "disable_snapshot_annotations = true"),
    }
    if series == "2":
        out["containerd_transfer_unpack"] = ('platform = "linux/amd64"\n  snapshotter = "peerpull"',
                                             'platform = "linux/amd64"\n  snapshotter = "overlayfs"')
        out["containerd_proxy_plugin"] = ('  exports = { enable_remote_snapshot_annotations = "true" }\n', "")
    return out


async def _wiring_checks(node: Node, config: Path) -> dict[str, tuple[bool, str]]:
    context = DoctorContext(load_config(environ=node.env()), config, timeout_s=5)
    return {r.name: (r.ok, r.message) for r in await check_containerd(context)}


def test_each_miswiring_doctor_knows_is_named(release: str, registry: EmbeddedRegistry, tmp_path: Path) -> None:
    """Against the running containerd of that release (its version decides the rules), the printed wiring
    with one thing wrong at a time: exactly that check fails."""
    series = _series(release)
    node = _start(release, tmp_path, registry)
    try:
        printed = node.config.read_text()
        wired = asyncio.run(_wiring_checks(node, node.config))
        assert all(ok for ok, _ in wired.values()), wired
        cases = {name: printed.replace(old.replace("@SOCKET@", str(node.daemon.socket)), new)
                 for name, (old, new) in _miswirings(series).items()}
        if series == "2":  # 2.1 takes either labels route: both gone to fail the annotations check
            cases["containerd_cri_annotations"] = cases["containerd_cri_annotations"].split(
                "# pulls through the transfer service")[0]
            rc = containerd_snippets.snippet(Wiring(containerd="2", socket=str(node.daemon.socket),
                                                    runtime_class="lazy"))
            cases["containerd_cri_runtime_platforms"] = printed[:printed.index("[proxy_plugins")] + \
                rc[:rc.index("# containerd 2.x unpacks")]
        else:
            rc = containerd_snippets.snippet(Wiring(containerd="1.7", socket=str(node.daemon.socket),
                                                    runtime_class="lazy"))
            cases["containerd_cri_default_runtime"] = printed[:printed.index("[proxy_plugins")] + rc
            cases["containerd_config_version"] = printed.replace("version = 2", "version = 3", 1)
        for name, text in cases.items():
            assert text != printed, name
            tomllib.loads(text)
            config = tmp_path / f"{name}.toml"
            config.write_text(text)
            checks = asyncio.run(_wiring_checks(node, config))
            failing = sorted(n for n, (ok, _) in checks.items() if not ok)
            assert name in failing, (name, checks)
            assert checks["containerd_socket"][0], checks
    finally:
        _stop(node)


TRANSFER_SERVICE_CRI = """
[proxy_plugins.peerpull]
  type = "snapshot"
  address = "@SOCKET@"
  exports = { enable_remote_snapshot_annotations = "true" }

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "peerpull"

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "peerpull"
"""


def test_containerd_2_1_transfer_service_cri_pull_without_the_annotations_setting(registry: EmbeddedRegistry,
                                                                                  tmp_path: Path) -> None:
    """containerd 2.1's CRI pulls through the transfer service when disable_snapshot_annotations is not
    set: still lazy, and doctor says so (it used to ask for the setting)."""
    release = "2.1.9"
    text = TRANSFER_SERVICE_CRI + _registry_table("2", _hosts(tmp_path, registry))
    node = _start(release, tmp_path, registry, wiring_text=text)
    try:
        assert "transfer service" in _doctor(node)["containerd_cri_annotations"]["message"]
        image = _make_image(registry, tmp_path)
        before = node.registry.blob_bytes(image.repo)
        node.cri_pull(image)
        _assert_lazy(node, image, before)
        assert node.read_in_container(CRI_NAMESPACE, image, "peerpull") == image.content
    finally:
        _stop(node)
