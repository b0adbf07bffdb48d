"""The node daemon: its snapshotter socket answering containerd's Snapshots API, its peer server healthy."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import grpc

import peerpull_proto as proto
from peer.client import PROTOCOL_VERSION
from peerpull.doctor.check import CheckResult, DoctorContext, failed, ok
from peerpull.status.client import local_node_address

_snap = proto.load("containerd.services.snapshots.v1.snapshots_pb2")
_snap_grpc = proto.load("containerd.services.snapshots.v1.snapshots_pb2_grpc")


async def check_daemon(context: DoctorContext) -> list[CheckResult]:
    return [await _snapshotter_socket(context), await _peer_health(context)]


async def _snapshotter_socket(context: DoctorContext) -> CheckResult:
    s = context.config.snapshotter
    if not Path(s.socket).exists():
        return failed("daemon_socket", f"{s.socket} does not exist: start `peerpull daemon` "
                                       "(or give the socket it uses: snapshotter.socket, --socket)")
    try:
        async with grpc.aio.insecure_channel(f"unix://{s.socket}") as channel:
            stub = _snap_grpc.SnapshotsStub(channel)
            count = 0
            async for answer in stub.List(_snap.ListSnapshotsRequest(snapshotter=s.name), timeout=context.timeout_s):
                count += len(answer.info)
    except grpc.aio.AioRpcError as exc:
        return failed("daemon_socket", f"{s.socket} does not answer Snapshots.List ({exc.code().name}: "
                                       f"{(exc.details() or '')[:120]}): is `peerpull daemon` running? see its log")
    return ok("daemon_socket", f"{s.socket} answers Snapshots.List ({count} snapshots)")


async def _peer_health(context: DoctorContext) -> CheckResult:
    address = local_node_address(context.config.peer)
    timeout = aiohttp.ClientTimeout(total=context.timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"http://{address}/v1/health") as resp:
                body = await resp.content.read(4096)
                status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return failed("daemon_peer_server", f"the peer server on {address} does not answer "
                                            f"({type(exc).__name__}): is `peerpull daemon` running with "
                                            "this peer.listen_port?")
    try:
        answer = json.loads(body) if status == 200 else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return failed("daemon_peer_server", f"the peer server on {address} answered HTTP {status} to /v1/health")
    if answer.get("protocol") != PROTOCOL_VERSION:
        return failed("daemon_peer_server", f"node {answer.get('node_id')} on {address} speaks peer protocol "
                                            f"{answer.get('protocol')}, this peerpull {PROTOCOL_VERSION}: upgrade it")
    context.facts["node_id"] = answer.get("node_id")
    return ok("daemon_peer_server", f"node {answer.get('node_id')} healthy on {address}")
