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
import sys
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


CLUSTER_SCOPED = {"RuntimeClass"}
# the chart's main object of a kind that the options add more of
MAIN = {"ConfigMap": "pp-config", "Service": "pp-peers"}


def _objects(values: dict[str, Any] | None = None) -> list[dict]:
    rendered = render_chart(CHART, values)
    return [doc for name, text in rendered.items() if name != "NOTES.txt" for doc in yaml.safe_load_all(text) if doc]


def _render(values: dict[str, Any] | None = None) -> tuple[dict[str, dict], str]:
    """(kind → the document of that kind (the main one, MAIN, if several), and "Kind/name" → each
    document, NOTES.txt)."""
    rendered = render_chart(CHART, values)
    docs: dict[str, dict] = {}
    for name, text in rendered.items():
        if name == "NOTES.txt":
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                kind, meta = doc["kind"], doc["metadata"]
                assert f"{kind}/{meta['name']}" not in docs, f"two {kind} {meta['name']}"
                if kind in CLUSTER_SCOPED:
                    assert "namespace" not in meta
                else:
                    assert meta["namespace"] == "kube-system" and doc["apiVersion"]
                docs[f"{kind}/{meta['name']}"] = doc
                if kind not in MAIN or MAIN[kind] == meta["name"]:
                    assert kind not in docs, f"two {kind} documents"
                    docs[kind] = doc
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
    assert {k for k in docs if "/" not in k} == {"ConfigMap", "DaemonSet", "Secret", "Service"}  # no Job or SA
    assert set(docs) - {"ConfigMap", "DaemonSet", "Secret", "Service"} == {
        "ConfigMap/pp-config", "ConfigMap/pp-containerd", "DaemonSet/pp-node", "Secret/pp-token", "Service/pp-peers"}
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
    assert render('{{ toString .Values.port }} {{ eq (toString .Values.port) "7470" }}') == "7470 true"
    (chart / "files").mkdir()
    (chart / "files" / "a.json").write_text('{"x": "{{ not a template }}"}\n')
    assert render('{{ .Files.Get "files/a.json" | indent 2 }}') == '  {"x": "{{ not a template }}"}\n  '
    assert render('{{ .Files.Get "files/missing.json" }}') == ""
    assert render('a {{ "{{" }} .NodeConfig.X }} b') == "a {{ .NodeConfig.X }} b"  # what a k3s template needs
    with pytest.raises(TemplateError, match="stop here"):
        render('{{ fail "stop here" }}')
    for bad in ("{{ range .Values.list }}{{ .Values.port }}{{ end }}",  # `.` is the item in range
                "{{ .Values.missing }}", "{{ .Values.port | sha256sum }}", "{{ with .Values.port }}{{ end }}",
                "{{ if .Values.port }}"):
        with pytest.raises((TemplateError, KeyError)):
            render(bad)


# --- schemas ------------------------------------------------------------------------------------

KUBERNETES_VERSIONS = ("1.29.0", "1.31.0")  # kubernetes-validate's bundled schemas (offline)
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}  # CRDs: checked structurally below
EVERYTHING = {"peer": {"token": "s3cret"}, "serviceAccount": {"create": True}, "nodeSelector": {"gpu": "yes"},
              "containerd": {"configure": True}, "runtimeClass": {"enabled": True},
              "registry": {"dockerConfigSecret": "regcred"}, "warmup": {"images": ["reg:5000/a:1"], "hook": True},
              "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                          "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}}
OPTIONS = {
    "default": {},
    "full": FULL,
    "everything": EVERYTHING,
    "runtime-class": {"runtimeClass": {"enabled": True}},
    "containerd-2": {"containerd": {"version": "2", "configure": True}},
    "k3s": {"containerd": {"flavor": "k3s", "configure": True}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True}}},
    "prometheus-rule": {"metrics": {"prometheusRule": {"enabled": True}}},
    "dashboard": {"metrics": {"dashboard": {"enabled": True}}},
    "existing-token": {"peer": {"existingTokenSecret": "t"}},
    "on-delete": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": None}},
}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_object_validates_against_the_kubernetes_schema(option: str, version: str) -> None:
    import kubernetes_validate

    objects = _objects(OPTIONS[option])
    checked = 0
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            continue
        # strict: unknown fields are errors too (a misspelt or misplaced key would be dropped by the API)
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 4  # ConfigMaps, DaemonSet, Service (+ Secret unless existing)


def test_the_schema_check_catches_a_misplaced_field() -> None:
    import kubernetes_validate

    (daemonset,) = [o for o in _objects() if o["kind"] == "DaemonSet"]
    daemonset["spec"]["template"]["spec"]["containers"][0]["mountPropagation"] = "Bidirectional"  # belongs to a mount
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[0], strict=True)


def _duration(text: str) -> bool:
    import re

    return re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", text) is not None


def test_service_monitor_scrapes_every_daemon_through_the_metrics_service() -> None:
    docs, _ = _render(OPTIONS["service-monitor"])
    monitor, service = docs["ServiceMonitor"], docs["Service/pp-metrics"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"] == "pp"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # not the peers' Service: that one has ready pods only, so a hung daemon would vanish instead of `up == 0`
    assert not spec["selector"]["matchLabels"].items() <= docs["Service/pp-peers"]["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": ["kube-system"]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert _duration(endpoint["interval"])
    assert service["spec"]["publishNotReadyAddresses"] is True and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"].items()
    labelled, _ = _render(EVERYTHING)
    assert labelled["ServiceMonitor"]["metadata"]["labels"]["release"] == "prom"


def _rules(values: dict[str, Any]) -> dict[str, dict]:
    docs, _ = _render(values)
    rule = docs["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    out = {}
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"} and r["expr"].strip()
            assert _duration(r["for"]) and r["labels"]["severity"] in {"critical", "warning", "info"}
            assert r["annotations"]["summary"] and "{{" not in r["expr"]
            out[r["alert"]] = r
    return out


def test_prometheus_rule_alerts_on_down_fallbacks_errors_and_a_full_cache() -> None:
    rules = _rules(OPTIONS["prometheus-rule"])
    assert set(rules) == {"PeerpullDaemonDown", "PeerpullHighRegistryFallback", "PeerpullFetchErrors",
                          "PeerpullCacheNearFull"}
    assert rules["PeerpullDaemonDown"]["expr"] == 'up{job="pp-metrics"} == 0'  # the metrics Service's job
    assert 'tier="origin"' in rules["PeerpullHighRegistryFallback"]["expr"]
    assert rules["PeerpullHighRegistryFallback"]["expr"].rstrip().endswith("> 0.5")
    assert rules["PeerpullCacheNearFull"]["expr"].split()[-3:] == ["0.95", "*", "21474836480"]  # peer.cacheMaxBytes
    tuned = _rules({"metrics": {"prometheusRule": {"enabled": True, "originRatio": 0.25}},
                    "peer": {"cacheMaxBytes": 1 << 30}})
    assert tuned["PeerpullHighRegistryFallback"]["expr"].rstrip().endswith("> 0.25")
    assert tuned["PeerpullCacheNearFull"]["expr"].endswith(str(1 << 30))


# --- metric names: code, dashboard, rules and docs agree ----------------------------------------------

REPO = CHART.parent.parent
_METRIC = r"peerpull_[a-z0-9_]+"


def _exported() -> dict[str, str]:
    """Every metric family the daemon exports → its type, from the metrics object itself."""
    from peer.metrics import PeerMetrics

    metrics = PeerMetrics()
    metrics.watch_registry_faults({"retry": 1})
    return {family.name: family.type for family in metrics.registry.collect()}


def _series_names(families: dict[str, str]) -> set[str]:
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created", "")}
    return {name + suffix for name, kind in families.items() for suffix in suffixes[kind]}


def _declared_in_source() -> set[str]:
    """Metric names passed to a prometheus_client constructor anywhere in the code (not only peer/metrics.py)."""
    import re

    pattern = re.compile(r'(?:Counter|Gauge|Histogram|Summary|Info|Enum|MetricFamily)\(\s*"(' + _METRIC + ')"')
    names = set()
    for package in ("peer", "peerpull", "snapshotter", "converter"):
        for path in (REPO / package).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    return names


def _dashboard() -> dict:
    import json

    return json.loads((CHART / "dashboards" / "peerpull.json").read_text())


def _dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_and_rules_use_only_metrics_the_code_exports() -> None:
    import re

    families = _exported()
    assert set(families) >= _declared_in_source() and len(families) >= 10
    series = _series_names(families)
    used = set()
    for expr in _dashboard_exprs(_dashboard()) + [r["expr"] for r in _rules(OPTIONS["prometheus-rule"]).values()]:
        names = set(re.findall(_METRIC, expr))
        assert names or re.fullmatch(r'up\{job="pp-metrics"\} == 0', expr), expr
        assert names <= series, (expr, names - series)
        used |= names
    # what the issue asks the dashboard to show
    for needed in ("peerpull_chunk_bytes_total", "peerpull_chunk_requests_total", "peerpull_chunk_fetch_seconds_bucket",
                   "peerpull_members", "peerpull_chunk_errors_total", "peerpull_cache_bytes"):
        assert needed in used, needed


def test_every_exported_metric_is_documented() -> None:
    import re

    families = _exported() | {name: "?" for name in _declared_in_source()}
    doc = (REPO / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`(" + _METRIC + r")`", doc))
    exposed = {name + ("_total" if kind == "counter" else "") for name, kind in _exported().items()}
    missing = {name for name in families if name not in documented and f"{name}_total" not in documented}
    assert not missing, f"metrics not in docs/metrics.md: {sorted(missing)}"
    stale = documented - _series_names(_exported()) - set(_exported())  # a histogram by its family name
    assert not stale, f"docs/metrics.md documents metrics the code does not export: {sorted(stale)}"
    assert exposed <= documented


def test_dashboard_json_is_a_grafana_dashboard_and_its_config_map_carries_it() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "peerpull" and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])
            assert panel["datasource"]["uid"] == "${datasource}"
    docs, _ = _render(OPTIONS["dashboard"])
    config_map = docs["ConfigMap/pp-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    import json

    assert json.loads(config_map["data"]["peerpull.json"]) == dashboard
    assert "ConfigMap/pp-dashboard" not in _render()[0]


# --- runtime class and containerd wiring ---------------------------------------------------------------

def test_runtime_class_serves_only_pods_that_ask_never_the_daemon_itself() -> None:
    docs, _ = _render({"runtimeClass": {"enabled": True, "name": "lazy"}, "warmup": {"images": ["x:1"]},
                       "nodeSelector": {"gpu": "yes"}})
    runtime_class = docs["RuntimeClass"]
    assert runtime_class["metadata"]["name"] == runtime_class["handler"] == "lazy"
    assert runtime_class["scheduling"]["nodeSelector"] == {"gpu": "yes"}  # only where the daemon runs
    # the daemon (and its warm-up pods) keep containerd's default snapshotter: a daemon served by itself
    # could not start again after a restart
    for kind in ("DaemonSet", "Job"):
        assert "runtimeClassName" not in _pod(docs, kind)
    wired = tomllib.loads(docs["ConfigMap/pp-containerd"]["data"]["config.toml"])
    cri = wired["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert "snapshotter" not in cri and cri["disable_snapshot_annotations"] is False  # default stays overlayfs
    assert cri["runtimes"]["lazy"] == {"runtime_type": "io.containerd.runc.v2", "snapshotter": "peerpull",
                                       "options": {"SystemdCgroup": True}}
    assert "RuntimeClass" not in _render()[0]
    with pytest.raises(TemplateError, match="1.7"):  # containerd 1.6 has no snapshotter per runtime
        _render({"runtimeClass": {"enabled": True}, "containerd": {"version": "1.6"}})


WIRINGS = [(version, flavor, runtime_class) for version in ("1.6", "1.7", "2") for flavor in ("containerd", "k3s")
           for runtime_class in ("", "peerpull") if not (runtime_class and version == "1.6")]


def _k3s_fields(template: str) -> str:
    """Fill in k3s's own template fields, as k3s would, to parse the result."""
    import re

    values = {"SELinux": "false", "SystemdCgroup": "true"}
    return re.sub(r"\{\{ \.([A-Za-z.]+) \}\}",
                  lambda m: values.get(m.group(1).rsplit(".", 1)[-1], "/var/lib/rancher/k3s/x"), template)


@pytest.mark.parametrize(("version", "flavor", "runtime_class"), WIRINGS)
def test_chart_renders_the_same_containerd_config_as_the_cli(version: str, flavor: str, runtime_class: str) -> None:
    from peerpull import containerd_snippets
    from peerpull.containerd_snippets import Wiring

    docs, _ = _render({"containerd": {"version": version, "flavor": flavor},
                       "runtimeClass": {"enabled": bool(runtime_class)}, "snapshotter": {"socket": "/run/peerpull/s.sock"}})
    (key, text), = docs["ConfigMap/pp-containerd"]["data"].items()
    wiring = Wiring(containerd=version, socket="/run/peerpull/s.sock", runtime_class=runtime_class)
    if flavor == "k3s":
        assert key == containerd_snippets.k3s_template_name(version) and text == containerd_snippets.k3s_template(wiring)
        parsed = tomllib.loads(_k3s_fields(text))
    else:
        assert key == "config.toml" and text == containerd_snippets.snippet(wiring)
        parsed = tomllib.loads(containerd_snippets.config_file(wiring))
    assert parsed["version"] == (3 if version == "2" else 2)
    proxy = parsed["proxy_plugins"]["peerpull"]
    assert proxy["type"] == "snapshot" and proxy["address"] == "/run/peerpull/s.sock"
    plugins = parsed["plugins"]
    if version == "2":
        assert proxy["exports"] == {"enable_remote_snapshot_annotations": "true"}
        images = plugins["io.containerd.cri.v1.images"]
        runtimes = plugins.get("io.containerd.cri.v1.runtime", {}).get("containerd", {}).get("runtimes", {})
        # a version 3 config has the CRI settings elsewhere; k3s keeps only its streaming server there
        assert set(plugins.get("io.containerd.grpc.v1.cri", {})) <= {"stream_server_address", "stream_server_port"}
    else:
        assert "exports" not in proxy
        images = plugins["io.containerd.grpc.v1.cri"]["containerd"]
        runtimes = images.get("runtimes", {})
    assert images["disable_snapshot_annotations"] is False
    if runtime_class:
        assert "snapshotter" not in images and runtimes[runtime_class]["snapshotter"] == "peerpull"
        assert "io.containerd.transfer.v1.local" not in plugins
        if version == "2":  # 2.x takes a pull's snapshotter from here, not from the runtime: else never lazy
            assert images["runtime_platforms"][runtime_class] == {"platform": "linux/amd64", "snapshotter": "peerpull"}
        if flavor == "containerd":  # the complete file keeps the default runtime (1.x's CRI does not load without)
            assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"
            assert "runc" not in tomllib.loads(text).get("plugins", {}).get(  # the appended snippet adds none
                "io.containerd.grpc.v1.cri", {}).get("containerd", {}).get("runtimes", {})
    else:
        assert images["snapshotter"] == "peerpull"
        if version == "2":
            (unpack,) = plugins["io.containerd.transfer.v1.local"]["unpack_config"]
            assert unpack == {"platform": "linux/amd64", "snapshotter": "peerpull"}
    if flavor == "k3s":  # k3s's settings are kept, through its template fields
        assert "{{ .NodeConfig.AgentConfig.PauseImage }}" in text and "{{ .NodeConfig.Containerd.Registry }}" in text
        assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"


def test_cli_prints_the_module_snippets(tmp_path: Path) -> None:
    from peerpull import containerd_snippets
    from peerpull.containerd_snippets import Wiring

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "peerpull", "containerd-config", *args], capture_output=True,
                              text=True, timeout=60,
                              check=False)

    done = cli("--containerd", "2", "--runtime-class", "lazy", "--no-systemd-cgroup")
    assert done.returncode == 0, done.stderr
    assert done.stdout == containerd_snippets.snippet(Wiring(containerd="2", runtime_class="lazy", systemd_cgroup=False,
                                                             platform="linux/amd64"))
    done = cli("--runtime-class", "lazy", "--default-runtime")
    assert done.returncode == 0 and done.stdout == containerd_snippets.snippet(Wiring(runtime_class="lazy",
                                                                                     default_runtime=True))
    assert ".runtimes.runc]" in done.stdout
    done = cli("--k3s")
    assert done.returncode == 0 and done.stdout == containerd_snippets.k3s_template(Wiring())
    refused = cli("--containerd", "1.6", "--runtime-class", "lazy")
    assert refused.returncode == 2 and "1.7" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_wiring_init_container_writes_a_version_3_config_for_containerd_2(tmp_path: Path) -> None:
    docs, _ = _render({"containerd": {"version": 2, "configure": True}})  # as `--set containerd.version=2` gives it
    (init,) = _pod(docs)["initContainers"]
    script = init["command"][2]
    assert "--containerd 2" in script
    conf = tmp_path / "host" / "etc" / "containerd" / "config.toml"
    conf.parent.mkdir(parents=True)
    from peerpull.commands.containerd_config_cmd import snippet as cli_snippet

    full = tmp_path / "full.toml"
    full.write_text(cli_snippet(PeerpullConfig(), containerd="2"))
    calls = tmp_path / "calls"
    env = _fake_bin(tmp_path / "bin", {"peerpull": f'echo "$*" >> {calls}\ncat {full}\n'})
    done = _sh(script.replace("conf=/host/", f"conf={tmp_path}/host/"), env)
    assert done.returncode == 0, done.stderr
    wired = tomllib.loads(conf.read_text())
    assert wired["version"] == 3 and wired["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] == "peerpull"
    assert "--containerd 2" in calls.read_text()
    # a version 2 file on a containerd 2 node: only the proxy plugin, said on stderr
    conf.write_text("version = 2\n")
    (tmp_path / "calls").unlink()
    done = _sh(script.replace("conf=/host/", f"conf={tmp_path}/host/"), env)
    assert "--no-cri" in calls.read_text() and "by hand" in done.stderr


def test_runtime_class_wiring_declares_runc_only_where_the_file_has_none(tmp_path: Path) -> None:
    """containerd 1.x's CRI does not load when a file declares runtimes but not its default runc."""
    docs, _ = _render({"runtimeClass": {"enabled": True, "name": "lazy"}, "containerd": {"configure": True}})
    (init,) = _pod(docs)["initContainers"]
    script = init["command"][2].replace("conf=/host/", f"conf={tmp_path}/host/")
    conf = tmp_path / "host" / "etc" / "containerd" / "config.toml"
    conf.parent.mkdir(parents=True)
    calls = tmp_path / "calls"
    env = _fake_bin(tmp_path / "bin", {"peerpull": f'echo "$*" >> {calls}\necho "# snippet"\n'})
    assert _sh(script, env).returncode == 0
    assert "--runtime-class lazy" in calls.read_text() and "--default-runtime" in calls.read_text()  # no file yet
    calls.unlink()
    conf.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
                    '  runtime_type = "io.containerd.runc.v2"\n')
    assert _sh(script, env).returncode == 0
    assert "--runtime-class lazy" in calls.read_text() and "--default-runtime" not in calls.read_text()


def test_k3s_wiring_writes_its_template_only_where_there_is_none(tmp_path: Path) -> None:
    docs, _ = _render({"containerd": {"flavor": "k3s", "configure": True,
                                      "configDir": "/var/lib/rancher/k3s/agent/etc/containerd"}})
    (init,) = _pod(docs)["initContainers"]
    script = init["command"][2].replace("tmpl=/host/", f"tmpl={tmp_path}/host/")
    tmpl = tmp_path / "host" / "var/lib/rancher/k3s/agent/etc/containerd" / "config.toml.tmpl"
    tmpl.parent.mkdir(parents=True)
    env = _fake_bin(tmp_path / "bin", {"peerpull": 'echo "template for: $*"\n'})
    done = _sh(script, env)
    assert done.returncode == 0, done.stderr
    assert "--k3s" in tmpl.read_text() and "restart k3s" in done.stdout
    tmpl.write_text("{{ template \"base\" . }}\n")  # the operator's own: left alone
    done = _sh(script, env)
    assert done.returncode == 0 and tmpl.read_text() == "{{ template \"base\" . }}\n" and "by hand" in done.stderr


@pytest.mark.root
def test_real_containerd_1_6_loads_the_rendered_snippet(tmp_path: Path) -> None:
    """The chart's containerd 1.6 snippet, appended to a private containerd 1.6's config: it starts, loads
    the proxy snapshotter, and its CRI plugin takes the snapshotter and the snapshot annotations."""
    from peerpull.testbed.containerd import EmbeddedContainerd

    version = subprocess.run(["containerd", "--version"], capture_output=True, text=True, check=True).stdout
    assert " 1.6." in version or " v1.6." in version, version
    docs, _ = _render({"containerd": {"version": "1.6"}, "snapshotter": {"socket": str(tmp_path / "pp.sock")}})
    text = docs["ConfigMap/pp-containerd"]["data"]["config.toml"]
    root = tmp_path / "ctrd"
    with EmbeddedContainerd(root, enable_cri=True, extra_config="\n" + text) as containerd:
        plugins = containerd.ctr("plugins", "ls").stdout.splitlines()
        (line,) = [p for p in plugins if p.split()[:2] == ["io.containerd.snapshotter.v1", "peerpull"]]
        assert line.split()[-1] == "ok", line
        log = containerd.log_path.read_text()
    assert "Snapshotter:peerpull" in log and "DisableSnapshotAnnotations:false" in log, log[-2000:]
