"""The containerd configuration that wires in the peerpull snapshotter, per containerd release.

One source of truth: `peerpull containerd-config` prints these, and the chart's tests check that
the chart renders exactly the same text (charts/peerpull/templates/containerd-configmap.yaml).

* containerd 1.6 and 1.7 read `version = 2` configs; the CRI plugin is
  `plugins."io.containerd.grpc.v1.cri"`.
* containerd 2.x reads `version = 3` configs; the CRI plugin is split into
  `plugins."io.containerd.cri.v1.images"` (snapshotter, snapshot annotations) and
  `plugins."io.containerd.cri.v1.runtime"` (runtimes); image pulls that go through the transfer
  service unpack with the snapshotter named in `plugins."io.containerd.transfer.v1.local"`'s
  `unpack_config`, and a proxy snapshotter must export `enable_remote_snapshot_annotations` to be
  given the layer labels.
* k3s generates containerd's config from `config.toml.tmpl` (`config-v3.toml.tmpl` for its
  containerd 2 builds), a Go template of its own: its `base` template disables snapshot
  annotations for every snapshotter but stargz, so extending it is not enough; `k3s_template`
  is a complete template that keeps k3s's own settings (paths, pause image, CNI, cgroup driver,
  registries) through k3s's template fields.

With a runtime class (containerd >= 1.7, which added a snapshotter per CRI runtime), the default
snapshotter stays overlayfs: only pods that ask for the runtime class use peerpull, and system
pods, including the peerpull daemon itself, never depend on the snapshotter they serve.
containerd 2.x picks the snapshotter of an image pull from the images plugin's
`runtime_platforms.<handler>`, not from the runtime's `snapshotter` (which only serves container
creation): both are written, or the pods' images are unpacked to overlayfs, downloaded whole.
containerd 1.x's CRI replaces its default `runtimes` table with any the file declares, and then
refuses to start without the `runc` runtime its `default_runtime_name` names: a complete file
(`config_file`, or `default_runtime`) declares `runc` too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from converter.format.errors import ConfigError

VERSIONS = ("1.6", "1.7", "2")
# Pods of the runtime class must carry this annotation too: containerd picks a runtime's
# snapshotter at image pull from it (kubelet does not tell the pull which runtime class it is for).
RUNTIME_HANDLER_ANNOTATION = "io.containerd.cri.runtime-handler"


@dataclass(frozen=True)
class Wiring:
    """What the snippets depend on."""

    containerd: str = "1.7"           # one of VERSIONS
    name: str = "peerpull"            # the proxy plugin's (snapshotter's) name
    socket: str = "/run/peerpull/snapshotter.sock"
    runtime_class: str = ""           # a CRI runtime handler using the snapshotter; "": the default snapshotter
    platform: str = "linux/amd64"     # containerd 2.x transfer service unpack platform
    systemd_cgroup: bool = True       # runc option of the runtime handler (the kubelet's cgroup driver)
    # with runtime_class: also declare the `runc` runtime (for a file that has none of its own)
    default_runtime: bool = False

    def __post_init__(self) -> None:
        if self.containerd not in VERSIONS:
            raise ConfigError(f"containerd version {self.containerd!r}: expected one of {', '.join(VERSIONS)}")
        if self.runtime_class and self.containerd == "1.6":
            raise ConfigError("a runtime class needs containerd 1.7 or later (1.6 has no snapshotter per runtime)")


def config_version(containerd: str) -> int:
    return 3 if containerd == "2" else 2


def _proxy(w: Wiring) -> list[str]:
    lines = [f"[proxy_plugins.{w.name}]", '  type = "snapshot"', f'  address = "{w.socket}"']
    if w.containerd == "2":
        lines.append('  exports = { enable_remote_snapshot_annotations = "true" }')
    return lines


def _runtime(w: Wiring, table: str, images: str) -> list[str]:
    cgroup = f"  SystemdCgroup = {'true' if w.systemd_cgroup else 'false'}"
    lines = []
    if w.default_runtime:
        lines += ["",
                  "# the default runtime, declared as a runtimes table replaces containerd's built-in one",
                  f"[{table}.containerd.runtimes.runc]",
                  '  runtime_type = "io.containerd.runc.v2"',
                  f"[{table}.containerd.runtimes.runc.options]",
                  cgroup]
    lines += [
        "",
        "# a runtime handler for the RuntimeClass: only its pods use the snapshotter",
        f"[{table}.containerd.runtimes.{w.runtime_class}]",
        '  runtime_type = "io.containerd.runc.v2"',
        f'  snapshotter = "{w.name}"',
        f"[{table}.containerd.runtimes.{w.runtime_class}.options]",
        cgroup,
    ]
    if w.containerd == "2":
        lines += ["",
                  "# containerd 2.x unpacks a pull for this handler with the snapshotter named here",
                  f"[{images}.runtime_platforms.{w.runtime_class}]",
                  f'  platform = "{w.platform}"',
                  f'  snapshotter = "{w.name}"']
    return lines


def _cri(w: Wiring) -> list[str]:
    images = 'plugins."io.containerd.cri.v1.images"' if w.containerd == "2" else \
        'plugins."io.containerd.grpc.v1.cri".containerd'
    lines = ["", f"[{images}]"]
    if not w.runtime_class:
        lines.append(f'  snapshotter = "{w.name}"')
    lines += ["  # pass layer digests and image references to the snapshotter (lazy pulls need them)",
              "  disable_snapshot_annotations = false"]
    if w.runtime_class:
        table = 'plugins."io.containerd.cri.v1.runtime"' if w.containerd == "2" else 'plugins."io.containerd.grpc.v1.cri"'
        lines += _runtime(w, table, images)
    if w.containerd == "2" and not w.runtime_class:
        lines += ["",
                  "# pulls through the transfer service unpack into the snapshotter as well",
                  '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
                  f'  platform = "{w.platform}"',
                  f'  snapshotter = "{w.name}"']
    return lines


def snippet(w: Wiring, cri: bool = True) -> str:
    """The tables to add to containerd's config.toml (`version = 2` for 1.6/1.7, 3 for 2.x)."""
    lines = _proxy(w) + (_cri(w) if cri else [])
    return "\n".join(lines) + "\n"


def config_file(w: Wiring) -> str:
    """A complete config.toml with only peerpull's settings (a node without a config yet)."""
    return f"version = {config_version(w.containerd)}\n\n" + snippet(dataclasses.replace(w, default_runtime=True))


def k3s_template_name(containerd: str) -> str:
    """The file k3s reads in /var/lib/rancher/k3s/agent/etc/containerd/."""
    return "config-v3.toml.tmpl" if containerd == "2" else "config.toml.tmpl"


def k3s_template(w: Wiring) -> str:
    """A complete k3s containerd template: k3s's settings through its template fields, plus peerpull."""
    if w.containerd == "2":
        runtime, images = 'plugins."io.containerd.cri.v1.runtime"', 'plugins."io.containerd.cri.v1.images"'
        head = [
            "version = 3",
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            '  path = "{{ .NodeConfig.Containerd.Opt }}"',
            "",
            '[plugins."io.containerd.grpc.v1.cri"]',  # still the streaming server's (kubectl exec, logs)
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "10010"',
            "",
            f"[{runtime}]",
            "  enable_selinux = {{ .NodeConfig.SELinux }}",
            "",
            f"[{images}.pinned_images]",
            '  sandbox = "{{ .NodeConfig.AgentConfig.PauseImage }}"',
            "",
            f"[{images}.registry]",
            '  config_path = "{{ .NodeConfig.Containerd.Registry }}"',
            "",
            f"[{runtime}.cni]",
            '  bin_dir = "{{ .NodeConfig.AgentConfig.CNIBinDir }}"',
            '  conf_dir = "{{ .NodeConfig.AgentConfig.CNIConfDir }}"',
            "",
            f"[{runtime}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"[{runtime}.containerd.runtimes.runc.options]",
            "  SystemdCgroup = {{ .SystemdCgroup }}",
        ]
    else:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        head = [
            "version = 2",
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            '  path = "{{ .NodeConfig.Containerd.Opt }}"',
            "",
            f"[{cri}]",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "10010"',
            "  enable_selinux = {{ .NodeConfig.SELinux }}",
            '  sandbox_image = "{{ .NodeConfig.AgentConfig.PauseImage }}"',
            "",
            f"[{cri}.registry]",
            '  config_path = "{{ .NodeConfig.Containerd.Registry }}"',
            "",
            f"[{cri}.cni]",
            '  bin_dir = "{{ .NodeConfig.AgentConfig.CNIBinDir }}"',
            '  conf_dir = "{{ .NodeConfig.AgentConfig.CNIConfDir }}"',
            "",
            f"[{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"[{cri}.containerd.runtimes.runc.options]",
            "  SystemdCgroup = {{ .SystemdCgroup }}",
        ]
    lines = [f"# k3s containerd template ({k3s_template_name(w.containerd)}), written by peerpull containerd-config --k3s",
             *head, "", *_proxy(w), *_cri(w)]
    return "\n".join(lines) + "\n"
