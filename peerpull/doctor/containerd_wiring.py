"""What containerd's config.toml must say for lazy pulls, for containerd 1.6/1.7 (config version 2,
or the old version 1) and 2.x (version 3): a pure reading of the parsed TOML, no I/O.

1.x: `[proxy_plugins.NAME]` with our socket; CRI's `snapshotter = NAME` and
`disable_snapshot_annotations = false` (its default is true: no layer labels, every layer downloaded).
2.x: the CRI image settings moved to `io.containerd.cri.v1.images`; the proxy plugin must export
`enable_remote_snapshot_annotations = "true"`; pulls go through the transfer service, which unpacks
to our snapshotter only with an `unpack_config` entry naming it. The CRI plugin's part (default
snapshotter or runtime handlers, annotations or 2.1's transfer-service pulls): containerd_cri.
"""

from __future__ import annotations

from typing import Any

from peerpull.doctor.check import CheckResult, failed, ok
from peerpull.doctor.containerd_cri import CriWiring
from peerpull.doctor.containerd_cri import table as _table

TRANSFER = "io.containerd.transfer.v1.local"


def version_of(version: str) -> tuple[int, int] | None:
    """`1.6.20~ds1` / `v2.1.9+unknown` → (1, 6) / (2, 1)."""
    parts = version.lstrip("v").split(".")
    if len(parts) < 2 or not parts[0].isdigit():
        return None
    minor = "".join(c for c in parts[1][:3] if c.isdigit()) or "0"
    return int(parts[0]), int(minor)


def check_wiring(data: dict[str, Any], name: str, socket: str,
                 daemon: tuple[int, int] | None) -> list[CheckResult]:
    """One result per requirement, each failure with the line to add; `daemon` is containerd's
    (major, minor) when it answered, else the config version says which generation it is for."""
    version = data.get("version", 1)
    generation = daemon[0] if daemon else (2 if version == 3 else 1)
    results: list[CheckResult] = []
    if generation == 1 and version == 3:
        results.append(failed("containerd_config_version", "config version 3 is for containerd 2.x; containerd 1.x "
                                                           "reads version 2: set version = 2 (peerpull containerd-config)"))
    elif generation >= 2 and version != 3:
        results.append(ok("containerd_config_version", f"config version {version}: containerd 2.x migrates it at "
                                                       "each start (`containerd config migrate` writes version 3)"))
    else:
        results.append(ok("containerd_config_version", f"config version {version} for containerd {generation}.x"))
    proxy = _proxy_plugin(data, name, socket, generation)
    results.append(proxy)
    cri = CriWiring.read(data, name, version)
    if cri.disabled:
        results.append(ok("containerd_cri", "the CRI plugin is disabled: only `peerpull pull` pulls lazily (no Kubernetes)"))
    else:
        results.extend(cri.check(generation, daemon, proxy.ok and _unpacks_to(data, name)))
    if generation >= 2:
        results.append(_transfer_unpack(data, name, cri.disabled or bool(cri.default)))
    return results


def _proxy_plugin(data: dict[str, Any], name: str, socket: str, generation: int) -> CheckResult:
    plugin = _table(data, "proxy_plugins", name)
    fix = f'add [proxy_plugins.{name}] type = "snapshot" address = "{socket}" (peerpull containerd-config)'
    if not plugin:
        return failed("containerd_proxy_plugin", f"no [proxy_plugins.{name}]: {fix}")
    if plugin.get("type") != "snapshot":
        return failed("containerd_proxy_plugin", f'[proxy_plugins.{name}] type is {plugin.get("type")!r}: set type = "snapshot"')
    if plugin.get("address") != socket:
        return failed("containerd_proxy_plugin", f"[proxy_plugins.{name}] address is {plugin.get('address')!r} but the "
                                                 f"daemon listens on {socket!r} (snapshotter.socket): make them the same")
    if generation >= 2:
        exported = _table(plugin, "exports").get("enable_remote_snapshot_annotations")
        if str(exported).lower() != "true":
            return failed("containerd_proxy_plugin", f"containerd 2.x passes no layer labels to a proxy snapshotter "
                                                     f"without [proxy_plugins.{name}.exports] "
                                                     'enable_remote_snapshot_annotations = "true"')
    return ok("containerd_proxy_plugin", f"[proxy_plugins.{name}] points at {socket}")


def _unpacks_to(data: dict[str, Any], name: str) -> bool:
    entries = _table(data, "plugins", TRANSFER).get("unpack_config", [])
    return isinstance(entries, list) and any(isinstance(e, dict) and e.get("snapshotter") == name for e in entries)


def _transfer_unpack(data: dict[str, Any], name: str, needed: bool) -> CheckResult:
    if _unpacks_to(data, name):
        return ok("containerd_transfer_unpack", f'[[plugins."{TRANSFER}".unpack_config]] unpacks to {name}')
    if not needed:  # a runtime class only: transfer-service pulls (ctr, nerdctl) stay on the default snapshotter
        return ok("containerd_transfer_unpack", f"no transfer-service unpack entry for {name}: with a runtime class "
                                                "only CRI pulls for its pods use it (peerpull pull does not need one)")
    return failed("containerd_transfer_unpack", f'containerd 2.x pulls through the transfer service: add '
                                                f'[[plugins."{TRANSFER}".unpack_config]] platform = "linux/amd64" '
                                                f'snapshotter = "{name}"')
