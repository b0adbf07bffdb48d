"""The CRI image proxy (when `cri.image_proxy` is on): its socket answering an image call, and
containerd's CRI behind it answering too (kubelet's pulls go through both)."""

from __future__ import annotations

from pathlib import Path

import grpc

import peerpull_proto as proto
from peerpull.doctor.check import CheckResult, DoctorContext, failed, ok

_api = proto.load("cri.runtime.v1.api_pb2")
_api_grpc = proto.load("cri.runtime.v1.api_pb2_grpc")
NAME = "cri_image_proxy"


async def check_cri(context: DoctorContext) -> list[CheckResult]:
    c = context.config.cri
    if not c.image_proxy:
        return []  # off: kubelet talks to containerd directly, private lazy images use docker config.json
    socket = Path(c.socket)
    if not socket.exists():
        return [failed(NAME, f"{socket} does not exist: start `peerpull daemon` with cri.image_proxy = true "
                             "(or give the socket it uses: cri.socket)")]
    try:
        async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
            answer = await _api_grpc.ImageServiceStub(channel).ImageFsInfo(_api.ImageFsInfoRequest(),
                                                                          timeout=context.timeout_s)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # the proxy forwarded it; containerd has no CRI
            return [failed(NAME, f"{socket} answers but containerd's CRI plugin does not: enable it "
                                 "(not in disabled_plugins) or set cri.containerd_socket to its endpoint")]
        return [failed(NAME, f"{socket} does not answer ImageFsInfo ({exc.code().name}: "
                             f"{' '.join((exc.details() or '').split())[:160]}): is `peerpull daemon` running, and "
                             f"containerd's CRI on {c.containerd_socket or context.config.snapshotter.containerd_address}?")]
    mounts = ", ".join(u.fs_id.mountpoint for u in answer.image_filesystems) or "no image filesystem"
    return [ok(NAME, f"{socket} answers for containerd's CRI ({mounts}); kubelet: "
                     f"--image-service-endpoint=unix://{socket}")]
