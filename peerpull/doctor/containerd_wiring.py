"""What containerd's config.toml must say for lazy pulls, for containerd 1.6/1.7 (config version 2,
or the old version 1) and 2.x (version 3): a pure reading of the parsed TOML, no I/O.

1.x: `[proxy_plugins.NAME]` with our socket; CRI's `snapshotter = NAME` and
`disable_snapshot_annotations = false` (its default is true: no layer labels, every layer downloaded).
2.x: the CRI image settings moved to `io.containerd.cri.v1.images`; the proxy plugin must export
`enable_remote_snapshot_annotations = "true"`; pulls go through the transfer service, which unpacks
to our snapshotter only with an `unpack_config` entry naming it.
"""

from __future__ import annotations

from typing import Any

from peerpull.doctor.check import CheckResult, failed, ok

CRI_V1, CRI_V2, CRI_V3_IMAGES = "cri", "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"
TRANSFER = "io.containerd.transfer.v1.local"


def major_of(version: str) -> int | None:
    """`1.6.20~ds1` / `v2.0.1` → 1 / 2."""
    head = version.lstrip("v").split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _table(data: Any, *keys: str) -> dict[str, Any]:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def check_wiring(data: dict[str, Any], name: str, socket: str, daemon_major: int | None) -> list[CheckResult]:
    """One result per requirement, each failure with the line to add."""
    version = data.get("version", 1)
    generation = daemon_major or (2 if version == 3 else 1)
    results: list[CheckResult] = []
    if generation == 1 and version == 3:
        results.append(failed("containerd_config_version", "config version 3 is for containerd 2.x; containerd 1.x "
                                                           "reads version 2: set version = 2 (peerpull containerd-config)"))
    elif generation >= 2 and version != 3:
        results.append(ok("containerd_config_version", f"config version {version}: containerd 2.x migrates it at "
                                                       "each start (`containerd config migrate` writes version 3)"))
    else:
        results.append(ok("containerd_config_version", f"config version {version} for containerd {generation}.x"))
    results.append(_proxy_plugin(data, name, socket, generation))
    results.extend(_cri(data, name, version, generation))
    if generation >= 2:
        results.append(_transfer_unpack(data, name))
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


def _cri(data: dict[str, Any], name: str, version: int, generation: int) -> list[CheckResult]:
    disabled = {str(p) for p in data.get("disabled_plugins", []) if isinstance(p, str)}
    if version == 3:
        plugin_id, table = CRI_V3_IMAGES, _table(data, "plugins", CRI_V3_IMAGES)
        where = f'[plugins."{CRI_V3_IMAGES}"]'
    else:
        plugin_id = CRI_V2 if version == 2 else CRI_V1
        table, where = _table(data, "plugins", plugin_id, "containerd"), f'[plugins."{plugin_id}".containerd]'
    if disabled & {plugin_id, CRI_V1, CRI_V2, CRI_V3_IMAGES}:
        return [ok("containerd_cri", "the CRI plugin is disabled: only `peerpull pull` pulls lazily (no Kubernetes)")]
    out: list[CheckResult] = []
    if table.get("snapshotter") != name:
        out.append(failed("containerd_cri_snapshotter", f"{where} snapshotter is {table.get('snapshotter', 'unset')!r}: "
                                                        f'set snapshotter = "{name}" for Kubernetes pulls'))
    else:
        out.append(ok("containerd_cri_snapshotter", f'{where} snapshotter = "{name}"'))
    if table.get("disable_snapshot_annotations", True) is not False:
        out.append(failed("containerd_cri_annotations", f"{where} disable_snapshot_annotations is not false (its default "
                                                        "is true): CRI pulls pass no layer labels and download every "
                                                        "layer; set disable_snapshot_annotations = false"))
    else:
        out.append(ok("containerd_cri_annotations", f"{where} disable_snapshot_annotations = false"))
    return out


def _transfer_unpack(data: dict[str, Any], name: str) -> CheckResult:
    entries = _table(data, "plugins", TRANSFER).get("unpack_config", [])
    if isinstance(entries, list) and any(isinstance(e, dict) and e.get("snapshotter") == name for e in entries):
        return ok("containerd_transfer_unpack", f'[[plugins."{TRANSFER}".unpack_config]] unpacks to {name}')
    return failed("containerd_transfer_unpack", f'containerd 2.x pulls through the transfer service: add '
                                                f'[[plugins."{TRANSFER}".unpack_config]] platform = "linux/amd64" '
                                                f'snapshotter = "{name}"')
