"""CRI's ImageService (runtime.v1) served as a proxy in front of containerd's, so that the
registry credentials kubelet sends with `PullImage` (from `imagePullSecrets`) reach the daemon: a
proxy snapshotter never sees them, and without them a lazy layer of a private image cannot be read.

Every call is forwarded as bytes (a generic handler, no decoding on the way), with its metadata and
its deadline, so fields and methods newer than our .proto pass through unchanged; only PullImage is
also decoded, to keep its AuthConfig in the CredentialStore (before forwarding: containerd prepares
the lazy snapshots while the pull is running). containerd's answer, error code and details included,
goes back as it came. Credentials are never logged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import structlog
from prometheus_client import Counter

import peerpull_proto as proto
from converter.registry.auth import Credentials
from converter.registry.credential_store import AuthConfig, CredentialStore

log = structlog.get_logger(__name__)
_api = proto.load("cri.runtime.v1.api_pb2")

SERVICE = "runtime.v1.ImageService"
# connection-level metadata that grpc sets itself on the upstream call
_OWN_METADATA = {"user-agent", "content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}
# how containerd 1.6–2.x words a pull the registry refused for its credentials (status code Unknown)
_AUTH_REFUSED = re.compile(r"401 Unauthorized|403 Forbidden|failed to authorize|authorization failed|"
                           r"unexpected status.*40[13]|pull access denied", re.IGNORECASE)

Behavior = Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]


def auth_refused(code: grpc.StatusCode, details: str) -> bool:
    """Did containerd refuse a pull because of its credentials?"""
    return code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or bool(
        _AUTH_REFUSED.search(details))


class CriImageProxy:
    """`proxy = CriImageProxy(store, containerd_address, counter); await proxy.start(socket)`; also the
    server's generic handler (grpc asks `service` of every call)."""

    def __init__(self, store: CredentialStore, containerd_address: str, requests: Counter | None = None) -> None:
        self._store = store
        self._target = containerd_address if "://" in containerd_address else f"unix://{containerd_address}"
        self._requests = requests  # peerpull_cri_requests_total{method,code}
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self._socket: Path | None = None

    async def start(self, socket_path: Path) -> None:
        """Listen on `socket_path` (replacing a stale socket file), root only."""
        limit = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self._channel = grpc.aio.insecure_channel(self._target, options=limit)
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        socket_path.unlink(missing_ok=True)
        self._server = grpc.aio.server(options=limit)
        self._server.add_generic_rpc_handlers((self,))
        self._server.add_insecure_port(f"unix://{socket_path}")
        await self._server.start()
        os.chmod(socket_path, 0o600)
        self._socket = socket_path
        log.info("cri_image_proxy_ready", socket=str(socket_path), containerd=self._target)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(5)
        if self._channel is not None:
            await self._channel.close()
        if self._socket is not None:
            self._socket.unlink(missing_ok=True)

    # the generic handler's one method
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if not method.startswith(f"/{SERVICE}/"):
            return None  # UNIMPLEMENTED: only the image service is ours to serve
        return grpc.unary_unary_rpc_method_handler(self._behavior(method))

    def _behavior(self, method: str) -> Behavior:
        name = method.rsplit("/", 1)[1]

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._forward(method, name, request, context)
        return forward

    async def _forward(self, method: str, name: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        assert self._channel is not None, "start() first"
        image, creds = self._remember(request) if name == "PullImage" else (None, None)
        metadata = tuple((k, v) for k, v in (context.invocation_metadata() or ())
                         if not k.startswith(":") and k not in _OWN_METADATA)
        remaining = context.time_remaining()
        call = self._channel.unary_unary(method)  # no (de)serializers: bytes in, bytes out
        try:
            answer: bytes = await call(request, metadata=metadata, timeout=remaining)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            self._count(name, code)
            if image is not None and creds is not None and auth_refused(code, details):  # an anonymous pull drops nothing
                self._store.drop(image, "containerd refused the credentials of the last pull", creds)
            log.info("cri_request_failed", method=name, code=code.name, image=image)
            await context.abort(code, details, tuple(exc.trailing_metadata() or ()))
            raise  # abort raises; this keeps type checkers sure
        self._count(name, grpc.StatusCode.OK)
        return answer

    def _remember(self, request: bytes) -> tuple[str | None, Credentials | None]:
        """Keep a PullImage's credentials: the image it pulls (None if it cannot be read), and them."""
        try:
            pull = _api.PullImageRequest.FromString(request)
        except Exception:  # a malformed request: containerd answers it
            return None, None
        image = str(pull.image.image)
        a = pull.auth
        try:
            return image, self._store.put(image, AuthConfig(username=a.username, password=a.password, auth=a.auth,
                                                            identity_token=a.identity_token,
                                                            registry_token=a.registry_token))
        except ValueError:
            log.warning("cri_credentials_unusable", image=image, reason="malformed image reference or auth field")
            return image, None

    def _count(self, name: str, code: grpc.StatusCode) -> None:
        if self._requests is not None:
            self._requests.labels(name, code.name).inc()
