"""containerd: its config file read and checked against this daemon, its socket answering and its version."""

from __future__ import annotations

import tomllib
from typing import Any

import grpc

from peerpull.doctor.check import CheckResult, DoctorContext, failed, ok
from peerpull.doctor.containerd_wiring import check_wiring, version_of

VERSION_METHOD = "/containerd.services.version.v1.Version/Version"


def _version_string(data: bytes) -> str:
    """Field 1 (`version`, a string) of containerd's VersionResponse, read off the wire: the one
    field doctor needs does not warrant generating the whole service."""
    at = 0
    while at < len(data):
        key = data[at]
        at += 1
        if key & 7 != 2:  # every field of VersionResponse is a string
            break
        length, shift = 0, 0
        while True:
            byte = data[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if key >> 3 == 1:
            return data[at:at + length].decode(errors="replace")
        at += length
    return ""


async def containerd_version(address: str, timeout_s: float) -> str:
    target = address if "://" in address else f"unix://{address}"
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(VERSION_METHOD, request_serializer=lambda _: b"",
                                   response_deserializer=_version_string)
        return str(await call(None, timeout=timeout_s))


async def check_containerd(context: DoctorContext) -> list[CheckResult]:
    s = context.config.snapshotter
    path = context.containerd_config
    data: dict[str, Any] | None = None
    results: list[CheckResult] = []
    try:
        data = tomllib.loads(path.read_text())
        results.append(ok("containerd_config", f"{path} parsed"))
    except FileNotFoundError:
        results.append(failed("containerd_config", f"{path} does not exist: write it with "
                                                   f"`peerpull containerd-config > {path}` and restart containerd "
                                                   "(or give --containerd-config PATH)"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        results.append(failed("containerd_config", f"{path} cannot be read as TOML ({exc}): fix it, then restart containerd"))
    address = s.containerd_address
    if data is not None:
        grpc_address = data.get("grpc", {}).get("address") if isinstance(data.get("grpc"), dict) else None
        if isinstance(grpc_address, str) and grpc_address:
            address = grpc_address
    try:
        version = await containerd_version(address, context.timeout_s)
        context.facts["containerd_version"] = version
        results.append(ok("containerd_socket", f"containerd {version} answers on {address}"))
    except grpc.aio.AioRpcError as exc:
        results.append(failed("containerd_socket", f"containerd does not answer on {address} "
                                                   f"({exc.code().name}: {(exc.details() or '')[:120]}): start it "
                                                   "(systemctl start containerd) or give snapshotter.containerd_address"))
        version = ""
    if data is not None:
        results.extend(check_wiring(data, s.name, s.socket, version_of(version) if version else None))
    return results
