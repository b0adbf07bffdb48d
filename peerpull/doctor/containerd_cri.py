"""The CRI plugin's part of containerd's wiring, read off the parsed config.toml: which snapshotter
Kubernetes pulls use (the default one, or runtime handlers' for a RuntimeClass) and whether those
pulls pass the layer labels a lazy pull needs.

* Labels: `disable_snapshot_annotations = false` (its default is true) on every release; or, from
  containerd 2.1, CRI pulls through the transfer service (unless `use_local_image_pull`), which
  passes them when the proxy plugin exports `enable_remote_snapshot_annotations` and an
  `unpack_config` entry names the snapshotter. 2.1 pulls locally whenever
  `disable_snapshot_annotations = false` is set, so either form works there.
* Runtime handlers (containerd >= 1.7): `runtimes.<handler>.snapshotter`; containerd 2.x takes a
  pull's snapshotter from `io.containerd.cri.v1.images`' `runtime_platforms.<handler>` instead,
  so a 2.x handler without that entry unpacks its pods' images to overlayfs.
* containerd 1.x replaces its built-in runtimes with those a file declares, and its CRI plugin
  does not load when `default_runtime_name` (runc) is not among them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peerpull.doctor.check import CheckResult, failed, ok

CRI_V1, CRI_V2 = "cri", "io.containerd.grpc.v1.cri"
CRI_V3_IMAGES, CRI_V3_RUNTIME = "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"


def table(data: Any, *keys: str) -> dict[str, Any]:
    """data[k1][k2]..., {} where any step is missing or not a table."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


@dataclass
class CriWiring:
    """What the config says to the CRI plugin about snapshotter `name`."""

    name: str
    version: int                      # the config's version (3: containerd 2.x names)
    disabled: bool
    images: dict[str, Any]            # where snapshotter and disable_snapshot_annotations live
    where: str                        # that table's name, for messages
    runtimes: dict[str, Any]          # runtime handlers
    runtime_table: str
    default_runtime: str              # 1.x: default_runtime_name
    handlers: list[str] = field(default_factory=list)  # handlers whose snapshotter is ours

    @classmethod
    def read(cls, data: dict[str, Any], name: str, version: int) -> CriWiring:
        disabled_plugins = {p for p in data.get("disabled_plugins", []) if isinstance(p, str)}
        if version == 3:
            images, where = table(data, "plugins", CRI_V3_IMAGES), f'[plugins."{CRI_V3_IMAGES}"]'
            containerd = table(data, "plugins", CRI_V3_RUNTIME, "containerd")
            runtime_table = f'plugins."{CRI_V3_RUNTIME}".containerd.runtimes'
            ids = {CRI_V3_IMAGES, CRI_V3_RUNTIME, CRI_V2}  # 2.x still serves CRI's gRPC from the latter
        else:
            plugin_id = CRI_V2 if version == 2 else CRI_V1
            images = containerd = table(data, "plugins", plugin_id, "containerd")
            where, runtime_table = f'[plugins."{plugin_id}".containerd]', f'plugins."{plugin_id}".containerd.runtimes'
            ids = {plugin_id, CRI_V2}
        runtimes = table(containerd, "runtimes")
        handlers = sorted(h for h, r in runtimes.items() if isinstance(r, dict) and r.get("snapshotter") == name)
        return cls(name, version, bool(disabled_plugins & ids), images, where, runtimes, runtime_table,
                   str(containerd.get("default_runtime_name", "runc")), handlers)

    @property
    def default(self) -> bool:
        return self.images.get("snapshotter") == self.name

    def check(self, generation: int, daemon: tuple[int, int] | None, transfer_ready: bool) -> list[CheckResult]:
        out = [self._snapshotter(daemon), self._annotations(generation, daemon, transfer_ready)]
        if generation >= 2 and self.handlers:
            out.append(self._runtime_platforms())
        if generation == 1:
            out.append(self._default_runtime())
        return out

    def _snapshotter(self, daemon: tuple[int, int] | None) -> CheckResult:
        if self.default:
            return ok("containerd_cri_snapshotter", f'{self.where} snapshotter = "{self.name}"')
        if not self.handlers:
            return failed("containerd_cri_snapshotter", f"{self.where} snapshotter is "
                          f"{self.images.get('snapshotter', 'unset')!r} and no runtime handler uses {self.name}: set "
                          f'snapshotter = "{self.name}" for Kubernetes pulls, or give a RuntimeClass handler one '
                          "(peerpull containerd-config [--runtime-class NAME])")
        if daemon == (1, 6):
            return failed("containerd_cri_snapshotter", f"runtime handler {', '.join(self.handlers)} names snapshotter "
                          f"{self.name}, but containerd 1.6 has no snapshotter per runtime (1.7 added it): upgrade, or "
                          f'set {self.where} snapshotter = "{self.name}"')
        return ok("containerd_cri_snapshotter", f"runtime handler {', '.join(self.handlers)} uses {self.name} "
                                                "(only its RuntimeClass's pods); the default snapshotter stays "
                                                f"{self.images.get('snapshotter', 'overlayfs')}")

    def _annotations(self, generation: int, daemon: tuple[int, int] | None, transfer_ready: bool) -> CheckResult:
        if self.images.get("disable_snapshot_annotations", True) is False:
            return ok("containerd_cri_annotations", f"{self.where} disable_snapshot_annotations = false")
        transfer_cri = generation >= 2 and (daemon is None or daemon >= (2, 1))
        if transfer_cri and transfer_ready and self.images.get("use_local_image_pull") is not True:
            return ok("containerd_cri_annotations", "CRI pulls go through the transfer service (containerd 2.1 or "
                                                    f"later), which passes layer labels to {self.name}")
        return failed("containerd_cri_annotations", f"{self.where} disable_snapshot_annotations is not false (its "
                                                    "default is true): CRI pulls pass no layer labels and download "
                                                    "every layer; set disable_snapshot_annotations = false")

    def _runtime_platforms(self) -> CheckResult:
        platforms = table(self.images, "runtime_platforms")
        missing = [h for h in self.handlers if table(platforms, h).get("snapshotter") != self.name]
        if not missing:
            return ok("containerd_cri_runtime_platforms", f"{self.where} runtime_platforms unpack "
                                                          f"{', '.join(self.handlers)} pulls to {self.name}")
        h = missing[0]
        return failed("containerd_cri_runtime_platforms", f"containerd 2.x unpacks the images of runtime handler {h} "
                      f"to the default snapshotter (downloaded whole) without [{self.where[1:-1]}.runtime_platforms.{h}] "
                      f'platform = "linux/amd64" snapshotter = "{self.name}"')

    def _default_runtime(self) -> CheckResult:
        if not self.runtimes:
            return ok("containerd_cri_default_runtime", f"no runtimes declared: the built-in {self.default_runtime}")
        if self.default_runtime in self.runtimes:
            return ok("containerd_cri_default_runtime", f"default runtime {self.default_runtime} is declared")
        return failed("containerd_cri_default_runtime", f"the CRI plugin does not load: the file declares runtimes "
                      f"({', '.join(sorted(self.runtimes))}), which replace the built-in ones, but not the default "
                      f"{self.default_runtime}: add [{self.runtime_table}.{self.default_runtime}] "
                      'runtime_type = "io.containerd.runc.v2"')
