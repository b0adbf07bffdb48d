"""The Helm chart renders to valid manifests that wire the daemon the way the code expects.

No helm binary is available here: tests/support/helm_render.py renders the Go-template subset the
chart uses (and refuses anything else). The shell scripts the chart embeds are run with /bin/sh
against fake `peerpull` commands.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from peerpull.commands.containerd_config_cmd import snippet
from peerpull.config import PeerpullConfig, load_config
from tests.support.helm_render import TemplateError, render_chart

CHART = Path(__file__).resolve().parent.parent / "charts" / "peerpull"

# What the program accepts, per the configuration reference (and what the chart may write).
KNOWN_KEYS = {
    "registry": {"insecure_hosts", "docker_config", "platform"},
    "peer": {"cache_dir", "cache_max_bytes", "listen_host", "listen_port", "token", "discovery", "static_peers",
             "dns_name", "dns_port", "origin_max_inflight", "prefetch_parallel", "trusted_registries"},
    "snapshotter": {"root", "socket", "prefetch", "containerd_address"},
    "log": {"level", "format"},
}

FULL = {"peer": {"token": "s3cret"}, "containerd": {"configure": True},
        "warmup": {"images": ["reg:5000/ml/torch:seekable", "reg:5000/ml/vllm:1"], "nodes": 3}}


def _render(values: dict[str, Any] | None = None) -> tuple[dict[str, dict], str]:
    """(kind → the one document of that kind, NOTES.txt)."""
    rendered = render_chart(CHART, values)
    docs: dict[str, dict] = {}
    for name, text in rendered.items():
        if name == "NOTES.txt":
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert doc["kind"] not in docs, f"two {doc['kind']} documents"
                assert doc["metadata"]["namespace"] == "kube-system" and doc["apiVersion"]
                docs[doc["kind"]] = doc
    return docs, rendered["NOTES.txt"]


def _pod(docs: dict[str, dict], kind: str = "DaemonSet") -> dict:
    return docs[kind]["spec"]["template"]["spec"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def _config(docs: dict[str, dict]) -> tuple[str, dict]:
    text = docs["ConfigMap"]["data"]["config.toml"]
    return text, tomllib.loads(text)


@pytest.fixture(scope="module")
def default() -> tuple[dict[str, dict], str]:
    return _render()


@pytest.fixture(scope="module")
def full() -> tuple[dict[str, dict], str]:
    return _render(FULL)


def test_default_chart_runs_the_daemon_privileged_with_fuse_and_shared_mounts(default) -> None:
    docs, _ = default
    assert set(docs) == {"ConfigMap", "DaemonSet", "Secret", "Service"}  # no Job or ServiceAccount
    pod = _pod(docs)
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["tolerations"] == [{"operator": "Exists"}] and "nodeSelector" not in pod
    assert pod["priorityClassName"] == "system-node-critical" and pod["terminationGracePeriodSeconds"] == 30
    assert "initContainers" not in pod
    (container,) = pod["containers"]
    # the fd holder first (fdHolder: started in a host scope, by pid), then the daemon itself
    assert container["command"][:2] == ["sh", "-c"] and pod["hostPID"] is True
    assert "peerpull fd-holder --detach --socket /run/peerpull/fd-holder.sock" in container["command"][2]
    assert container["command"][2].rstrip().endswith("exec peerpull daemon --config /etc/peerpull/config.toml")
    assert container["image"] == "ghcr.io/example/peerpull:0.1.0"  # tag defaults to appVersion
    assert container["securityContext"]["privileged"] is True
    assert container["resources"]["limits"]["memory"] == "2Gi"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    host = {volumes[n]["hostPath"]["path"]: (volumes[n]["hostPath"]["type"], m) for n, m in mounts.items()
            if "hostPath" in volumes[n]}
    assert host["/dev/fuse"][0] == "CharDevice" and host["/dev/fuse"][1]["mountPath"] == "/dev/fuse"
    state_type, state = host["/var/lib/peerpull"]
    assert state_type == "DirectoryOrCreate" and state["mountPath"] == "/var/lib/peerpull"
    assert state["mountPropagation"] == "Bidirectional"
    assert host["/run/peerpull"] == ("DirectoryOrCreate", mounts["run"])
    assert mounts["run"]["mountPath"] == "/run/peerpull"
    assert host["/run/containerd"][1]["mountPath"] == "/run/containerd"
    assert "/etc/containerd" not in host  # only the wiring init container needs it
    assert volumes[next(n for n, m in mounts.items() if m["mountPath"] == "/etc/peerpull")]["configMap"]["name"] \
        == docs["ConfigMap"]["metadata"]["name"]

    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v1/health", "port": 7470}
    assert container["ports"] == [{"name": "peer", "containerPort": 7470, "protocol": "TCP"}]
    env = _env(container)
    assert env["PEERPULL_PEER_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["PEERPULL_PEER_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    # a token always: the daemon refuses to serve peers on the node network without one
    assert env["PEERPULL_PEER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "pp-token", "key": "token"}


def test_selectors_match_and_the_pod_template_does_not_change_with_the_chart_version(default) -> None:
    docs, _ = default
    ds = docs["DaemonSet"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is False
    assert service["ports"][0]["name"] == "peer" and service["ports"][0]["port"] == 7470
    assert not any("version" in k or k.startswith("helm.sh") for k in pod_labels)


def test_config_map_has_only_known_keys_and_the_daemon_accepts_it(default, tmp_path: Path) -> None:
    docs, _ = default
    text, parsed = _config(docs)
    assert set(parsed) == set(KNOWN_KEYS)
    for section, keys in parsed.items():
        assert set(keys) <= KNOWN_KEYS[section], section
    for section in parsed.values():  # integers, not Go's float64 output (2.147483648e+10)
        assert not any(isinstance(v, float) for v in section.values()), section
    assert parsed["peer"]["cache_max_bytes"] == 21474836480
    assert parsed["peer"]["discovery"] == "dns"
    assert parsed["peer"]["dns_name"] == "pp-peers.kube-system.svc.cluster.local"  # the headless Service
    assert "token" not in parsed["peer"] and "docker_config" not in parsed["registry"]  # unset: left out
    assert parsed["snapshotter"] == {"root": "/var/lib/peerpull/snapshotter",
                                     "socket": "/run/peerpull/snapshotter.sock", "prefetch": "sequential",
                                     "containerd_address": "/run/containerd/containerd.sock"}
    assert parsed["log"] == {"level": "info", "format": "json"}

    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load_config(str(path), environ={"PEERPULL_PEER_TOKEN": "t"})  # unknown keys or bad values raise
    assert config.peer.listen_port == 7470 and config.peer.origin_max_inflight == 8
    assert config.peer.prefetch_parallel == 64 and config.peer.token == "t"


def test_config_values_are_rendered_and_empty_ones_left_out(tmp_path: Path) -> None:
    docs, _ = _render({"registry": {"insecureHosts": ["reg.local:5000", "b:5000"], "dockerConfigSecret": "regcred"},
                       "peer": {"discovery": "static", "staticPeers": ["10.0.0.2:7470"], "cacheMaxBytes": 1 << 30,
                                "prefetchParallel": 0, "trustedRegistries": ["reg.local:5000"]},
                       "snapshotter": {"prefetch": "layer"}, "log": {"format": ""}})
    text, parsed = _config(docs)
    assert parsed["registry"]["insecure_hosts"] == ["reg.local:5000", "b:5000"]
    assert parsed["peer"]["static_peers"] == ["10.0.0.2:7470"] and "dns_name" not in parsed["peer"]
    assert parsed["peer"]["trusted_registries"] == ["reg.local:5000"]
    assert "prefetch_parallel" not in parsed["peer"] and "format" not in parsed["log"]
    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load_config(str(path), environ={})
    assert config.registry.insecure_hosts == ("reg.local:5000", "b:5000") and config.peer.cache_max_bytes == 1 << 30
    assert config.snapshotter.prefetch == "layer" and config.peer.discovery == "static"
    assert config.peer.trusted_registries == ("reg.local:5000",)
    # the credentials Secret is mounted where docker_config points
    container = _pod(docs)["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "registry-credentials")
    volume = next(v for v in _pod(docs)["volumes"] if v["name"] == "registry-credentials")
    assert volume["secret"]["secretName"] == "regcred"
    assert config.registry.docker_config == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"


def _token(docs: dict[str, dict]) -> str:
    return base64.b64decode(docs["Secret"]["data"]["token"]).decode()


def test_token_goes_to_a_secret_and_the_probes_use_the_open_health_endpoint(full) -> None:
    docs, _ = full
    assert _token(docs) == "s3cret" and set(docs["Secret"]["data"]) == {"token"}
    assert "s3cret" not in docs["ConfigMap"]["data"]["config.toml"]
    container = _pod(docs)["containers"][0]
    ref = {"name": docs["Secret"]["metadata"]["name"], "key": "token"}
    assert _env(container)["PEERPULL_PEER_TOKEN"]["valueFrom"]["secretKeyRef"] == ref
    # /v1/health needs no token (probes cannot read a Secret)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v1/health", "port": 7470}
    # the warm-up pods need the token as well, or the node refuses them
    assert _env(_pod(docs, "Job")["containers"][0])["PEERPULL_PEER_TOKEN"]["valueFrom"]["secretKeyRef"] == ref


def test_without_a_token_one_is_generated_and_kept_across_upgrades(default) -> None:
    first = _token(default[0])
    assert len(first) == 40 and first.isalnum()
    assert _token(_render()[0]) != first  # `helm template` without a cluster: a fresh one each time
    stored = {("v1", "Secret", "kube-system", "pp-token"): {"data": {"token": base64.b64encode(b"kept").decode()}}}
    upgraded = render_chart(CHART, None, revision=2, lookups=stored)
    secret = yaml.safe_load(upgraded["secret.yaml"])
    assert base64.b64decode(secret["data"]["token"]) == b"kept"  # read back from the cluster


def test_existing_token_secret_is_used_instead_of_creating_one() -> None:
    docs, _ = _render({"peer": {"token": "ignored", "existingTokenSecret": "cluster-token",
                                "existingTokenSecretKey": "t"}})
    assert "Secret" not in docs
    env = _env(_pod(docs)["containers"][0])
    assert env["PEERPULL_PEER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "cluster-token", "key": "t"}


def test_service_account_only_when_asked() -> None:
    docs, _ = _render({"serviceAccount": {"create": True}})
    account = docs["ServiceAccount"]
    assert account["metadata"]["name"] == "pp" and account["automountServiceAccountToken"] is False
    assert _pod(docs)["serviceAccountName"] == "pp"


def test_warmup_job_warms_each_image_on_distinct_nodes(full) -> None:
    docs, _ = full
    job = docs["Job"]
    assert job["metadata"]["name"] == "pp-warmup-1" and "annotations" not in job["metadata"]
    spec = job["spec"]
    assert spec["parallelism"] == spec["completions"] == 3
    assert spec["backoffLimit"] == 2 and spec["ttlSecondsAfterFinished"] == 3600
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["restartPolicy"] == "Never"
    assert pod["tolerations"] == _pod(docs)["tolerations"]
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    assert set(_env(container)) == {"PEERPULL_PEER_TOKEN"}
    assert container["command"][:2] == ["sh", "-c"] and "peerpull warm" in container["command"][2]

    hooked, _ = _render({"warmup": {"images": ["x:1"], "hook": True}})
    assert hooked["Job"]["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert hooked["Job"]["spec"]["parallelism"] == 1
    assert render_chart(CHART, FULL, revision=4)["warmup-job.yaml"].count("name: pp-warmup-4") == 1


def _fake_bin(bin_dir: Path, scripts: dict[str, str]) -> dict[str, str]:
    """Scripts named like commands, first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _sh(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], check=False, env=env, capture_output=True, text=True, timeout=10)


def test_warmup_script_runs_peerpull_warm_per_image_and_waits_for_the_daemon(full, tmp_path: Path) -> None:
    script = _pod(full[0], "Job")["containers"][0]["command"][2]
    calls = tmp_path / "calls"
    # the node's daemon is unreachable (exit 5) at the first call, then answers; `--node` is HOST:PORT
    # (warm builds the http:// URL itself): the node's loopback, as its own operator (host network)
    env = _fake_bin(tmp_path / "bin", {
        "peerpull": f'echo "$*" >> {calls}\n[ "$(wc -l < {calls})" -eq 1 ] && exit 5\nexit 0\n',
        "sleep": "exit 0\n",
    })
    done = _sh(script, env)
    assert done.returncode == 0, done.stderr
    deadlines = "--timeout 3600 --idle-timeout 60"
    assert calls.read_text().splitlines() == [
        f"warm reg:5000/ml/torch:seekable --node 127.0.0.1:7470 {deadlines}",
        f"warm reg:5000/ml/torch:seekable --node 127.0.0.1:7470 {deadlines}",
        f"warm reg:5000/ml/vllm:1 --node 127.0.0.1:7470 {deadlines}",
    ]
    calls.unlink()
    env = _fake_bin(tmp_path / "bin", {"peerpull": f'echo "$*" >> {calls}\nexit 7\n'})
    failed = _sh(script, env)
    assert failed.returncode == 7 and len(calls.read_text().splitlines()) == 1  # not found: no retry, no next image
    calls.unlink()
    env = _fake_bin(tmp_path / "bin", {"peerpull": f'echo "$*" >> {calls}\nexit 1\n'})  # a hung daemon: warm gave up
    failed = _sh(script, env)
    assert failed.returncode == 1 and len(calls.read_text().splitlines()) == 1 and "failed (exit 1)" in failed.stderr


def _wire(script: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Run the wiring init container's script on a fake host root, with a fake `peerpull`."""
    conf = tmp_path / "host" / "etc" / "containerd" / "config.toml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    full, proxy_only = tmp_path / "full.toml", tmp_path / "proxy.toml"
    full.write_text(snippet(PeerpullConfig()))
    proxy_only.write_text(snippet(PeerpullConfig(), cri=False))
    fake = f'case " $* " in *" --no-cri "*) cat {proxy_only};; *) cat {full};; esac\n'
    env = _fake_bin(tmp_path / "bin", {"peerpull": fake})
    done = _sh(script.replace("conf=/host/", f"conf={tmp_path}/host/"), env)
    return done, conf, conf.with_name("config.toml.before-peerpull")


def test_containerd_wiring_appends_the_snippet_once_and_never_breaks_the_file(full, tmp_path: Path) -> None:
    (init,) = _pod(full[0])["initContainers"]
    assert init["command"][:2] == ["sh", "-c"] and init["image"] == _pod(full[0])["containers"][0]["image"]
    script = init["command"][2]
    assert not any(word in script for word in ("systemctl", "kill", "ctr ", "nsenter"))  # containerd is not restarted
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert {"/etc/peerpull", "/host/etc/containerd"} <= mounts

    # no config yet: a complete version 2 file
    done, conf, backup = _wire(script, tmp_path)
    assert done.returncode == 0, done.stderr
    wired = tomllib.loads(conf.read_text())
    assert wired["version"] == 2 and wired["proxy_plugins"]["peerpull"]["address"] == "/run/peerpull/snapshotter.sock"
    cri = wired["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "peerpull", "disable_snapshot_annotations": False}
    assert "restart containerd" in done.stdout and not backup.exists()

    # again: nothing changes
    before = conf.read_text()
    done, conf, _ = _wire(script, tmp_path)
    assert done.returncode == 0 and conf.read_text() == before and "nothing to do" in done.stdout

    # a distribution's default config, with its own CRI table: only the proxy plugin, still valid TOML
    original = ('version = 2\n\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "overlayfs"\n'
                '  disable_snapshot_annotations = true\n')
    conf.write_text(original)
    done, conf, backup = _wire(script, tmp_path)
    assert done.returncode == 0, done.stderr
    wired = tomllib.loads(conf.read_text())
    assert wired["proxy_plugins"]["peerpull"]["type"] == "snapshot"
    assert wired["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"] == "overlayfs"
    assert backup.read_text() == original and "by hand" in done.stderr


def test_notes_say_how_to_wire_containerd_and_that_it_must_be_restarted(default, full) -> None:
    _, notes = default
    assert "peerpull containerd-config" in notes and "kubectl -n kube-system exec ds/pp-node" in notes
    _, notes = full
    assert "restart containerd" in notes.lower() and "containerd-wiring" in notes


def test_the_renderer_behaves_like_helm_on_what_the_chart_relies_on(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: t\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("big: 21474836480\nport: 7470\nmillion: 1000000\nlist: [a, b]\n")

    def render(template: str) -> str:
        (chart / "templates" / "t.yaml").write_text(template)
        return render_chart(chart)["t.yaml"]

    # values are float64 in Helm: big integers print in Go's exponent form unless piped through int64
    assert render("{{ .Values.big }} {{ .Values.big | int64 }} {{ .Values.port }} {{ .Values.million }}") \
        == "2.147483648e+10 21474836480 7470 1e+06"
    assert render("a\n  {{- if .Values.port }} x {{- else }}y{{ end -}}\n b") == "a xb"
    assert render('{{ range .Values.list }}[{{ . | quote }}]{{ end }}') == '["a"]["b"]'
    assert render('{{ printf "%s-%d" "x" .Values.port }}') == "x-7470"
    assert render('{{ "" | default (printf "%s" "y" | b64enc) }}') == "eQ=="
    assert render('{{ lookup "v1" "Secret" "ns" "n" | dig "data" "token" "none" }}') == "none"
    assert len(render("{{ randAlphaNum 12 }}")) == 12
    for bad in ("{{ range .Values.list }}{{ .Values.port }}{{ end }}",  # `.` is the item in range
                "{{ .Values.missing }}", "{{ .Values.port | sha256sum }}", "{{ with .Values.port }}{{ end }}",
                "{{ if .Values.port }}"):
        with pytest.raises((TemplateError, KeyError)):
            render(bad)
