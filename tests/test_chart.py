"""The Helm chart renders to valid manifests that wire the daemon the way the code expects."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import yaml

from peerpull.config import PeerpullConfig, load_config
from tests.support.helm_render import render_chart

CHART = Path(__file__).resolve().parent.parent / "charts" / "peerpull"


def _docs(rendered: dict[str, str]) -> dict[str, dict]:
    out = {}
    for name, text in rendered.items():
        if name.endswith(".txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out[doc["kind"]] = doc
    return out


def test_default_chart_runs_the_daemon_privileged_with_fuse_and_shared_mounts() -> None:
    docs = _docs(render_chart(CHART))
    assert set(docs) == {"ConfigMap", "DaemonSet", "Service"}  # no Job, no Secret by default
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["tolerations"] == [{"operator": "Exists"}]
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    assert container["args"] == ["--config", "/etc/peerpull/config.toml", "daemon"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["state"]["mountPath"] == "/var/lib/peerpull" and mounts["state"]["mountPropagation"] == "Bidirectional"
    assert mounts["dev-fuse"]["mountPath"] == "/dev/fuse"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dev-fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v1/health", "port": 7470}
    env = {e["name"]: e for e in container["env"]}
    assert env["PEERPULL_PEER_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "PEERPULL_PEER_TOKEN" not in env and "initContainers" not in pod
    assert docs["Service"]["spec"]["clusterIP"] == "None"


def test_config_map_is_a_config_the_daemon_accepts(tmp_path: Path) -> None:
    docs = _docs(render_chart(CHART, {"registry": {"insecureHosts": ["reg.local:5000"]}}))
    text = docs["ConfigMap"]["data"]["config.toml"]
    parsed = tomllib.loads(text)
    assert set(parsed) == {"registry", "peer", "snapshotter", "log"}
    path = tmp_path / "config.toml"
    path.write_text(text)
    config: PeerpullConfig = load_config(str(path), environ={})  # unknown keys or bad values would raise
    assert config.registry.insecure_hosts == ("reg.local:5000",)
    assert config.peer.discovery == "dns" and config.peer.dns_name == "pp-peers.kube-system.svc.cluster.local"
    assert config.snapshotter.socket == "/run/peerpull/snapshotter.sock"
    assert dataclasses.asdict(config.snapshotter)["prefetch"] == "file"


def test_token_warmup_and_containerd_wiring_when_asked() -> None:
    rendered = render_chart(CHART, {"peer": {"token": "s3cret"}, "containerd": {"configure": True},
                                    "warmup": {"images": ["reg:5000/ml/torch:seekable", "reg:5000/ml/vllm:1"],
                                               "nodes": 3, "hook": True}})
    docs = _docs(rendered)
    assert docs["Secret"]["stringData"] == {"token": "s3cret"}
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["PEERPULL_PEER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "pp-token", "key": "token"}
    (init,) = pod["initContainers"]
    assert "containerd-config" in init["command"][2] and "proxy_plugins.peerpull" in init["command"][2]
    job = docs["Job"]
    assert job["spec"]["parallelism"] == 3 and job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert script.count("peerpull warm") == 2 and '"reg:5000/ml/vllm:1"' in script and "$NODE_IP:7470" in script
    assert "restart containerd" in rendered["NOTES.txt"].lower()
