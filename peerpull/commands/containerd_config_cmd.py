"""`peerpull containerd-config`: the containerd configuration that wires in the snapshotter."""

from __future__ import annotations

import argparse
import platform
from typing import Any

from peerpull import containerd_snippets
from peerpull.config import PeerpullConfig
from peerpull.containerd_snippets import Wiring

DESCRIPTION = """\
Print what to add to containerd's config.toml so that containerd uses the peerpull daemon: the
proxy snapshotter, and for Kubernetes the CRI plugin's snapshotter with snapshot annotations
enabled (without them containerd passes no layer labels and every layer is downloaded).
containerd 1.6 and 1.7 read `version = 2` configs, containerd 2.x `version = 3` ones, whose CRI
settings are named differently: say which with --containerd. Restart containerd after adding it.

With --runtime-class NAME (containerd 1.7 or later) the default snapshotter is left alone and a CRI
runtime handler NAME uses peerpull: only pods with `runtimeClassName: NAME` (and the annotation
io.containerd.cri.runtime-handler: NAME, which containerd reads at image pull) are pulled lazily.
For a config.toml that declares no runc runtime of its own add --default-runtime: containerd 1.x
drops its built-in runtimes when a file declares any, and its CRI plugin then does not load.

With --k3s it prints a complete k3s containerd template instead (k3s writes containerd's config
from /var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl, or config-v3.toml.tmpl for its
containerd 2 builds); save it there and restart k3s.

examples:
  peerpull containerd-config >> /etc/containerd/config.toml && systemctl restart containerd
  peerpull containerd-config --containerd 2 --runtime-class peerpull
  peerpull containerd-config --k3s > /var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl
"""


def wiring(config: PeerpullConfig, containerd: str = "1.7", runtime_class: str = "",
           systemd_cgroup: bool = True, default_runtime: bool = False) -> Wiring:
    """The snippets' inputs from the daemon's configuration (socket, name, platform)."""
    s = config.snapshotter
    return Wiring(containerd=containerd, name=s.name, socket=s.socket, runtime_class=runtime_class,
                  platform=config.registry.platform or _host_platform(), systemd_cgroup=systemd_cgroup,
                  default_runtime=default_runtime)


def _host_platform() -> str:
    arch = platform.machine().lower()
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)


def snippet(config: PeerpullConfig, cri: bool = True, containerd: str = "1.7", runtime_class: str = "") -> str:
    return containerd_snippets.snippet(wiring(config, containerd, runtime_class), cri=cri)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("containerd-config", help="print the containerd config snippet for the snapshotter",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: snapshotter.socket)")
    p.add_argument("--containerd", choices=containerd_snippets.VERSIONS, default="1.7",
                   help="containerd release the config is for (default: 1.7; 1.6 and 1.7 print the same "
                        "unless --runtime-class)")
    p.add_argument("--runtime-class", metavar="NAME", default="",
                   help="wire a CRI runtime handler NAME instead of the default snapshotter (containerd >= 1.7)")
    p.add_argument("--default-runtime", action="store_true",
                   help="with --runtime-class, declare the runc runtime too: for a config.toml that declares "
                        "none (containerd 1.x's CRI does not load when runtimes are declared without it)")
    p.add_argument("--no-systemd-cgroup", action="store_true",
                   help="the runtime handler's runc uses cgroupfs (kubelet's cgroupDriver: cgroupfs)")
    p.add_argument("--k3s", action="store_true", help="print a complete k3s containerd template")
    p.add_argument("--no-cri", action="store_true", help="only the proxy plugin, not the Kubernetes (CRI) settings")
    p.set_defaults(handler=run)
    return p


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    w = wiring(config, args.containerd, args.runtime_class, not args.no_systemd_cgroup, args.default_runtime)
    if args.k3s:
        print(containerd_snippets.k3s_template(w), end="")
    else:
        print(containerd_snippets.snippet(w, cri=not args.no_cri), end="")
    return 0
