"""Registries that demand credentials: htpasswd (Basic) and Distribution's token auth (Bearer).

The token server is ours (a small aiohttp app issuing RS256 JWTs signed by a throwaway key whose
self-signed certificate is the registry's `rootcertbundle`); the registry verifying the tokens is
the real Distribution registry.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
import uuid
from pathlib import Path

import bcrypt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from peerpull.testbed.registry import EmbeddedRegistry
from tests.support.aio_site import serve_local

USER, PASSWORD = "alice", "s3cret"
SERVICE, ISSUER = "peerpull-test-registry", "peerpull-test-issuer"


def htpasswd_registry(root: Path) -> EmbeddedRegistry:
    root.mkdir(parents=True, exist_ok=True)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (root / "htpasswd").write_text(f"{USER}:{hashed}\n")
    extra = f"auth:\n  htpasswd:\n    realm: peerpull-test\n    path: {root / 'htpasswd'}\n"
    return EmbeddedRegistry(root, extra_config=extra)


def write_docker_config(directory: Path, registry: str, user: str, password: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    return directory


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues tokens to alice/s3cret for whatever repository scopes she asks for."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peerpull test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                      .sign(self._key, hashes.SHA256()))
        self.cert_path = root / "token-cert.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.issued = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    def _token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": repo, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    async def _handle(self, request: web.Request) -> web.Response:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, text="bad credentials")
        self.issued += 1
        token = self._token(request.query.getall("scope", []))
        return web.json_response({"token": token, "expires_in": 300})

    async def start(self) -> TokenServer:
        app = web.Application()
        app.router.add_get("/token", self._handle)
        self._runner, address = await serve_local(app)
        self.url = f"http://{address}/token"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def registry(self, root: Path) -> EmbeddedRegistry:
        extra = (f"auth:\n  token:\n    realm: {self.url}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                 f"    rootcertbundle: {self.cert_path}\n")
        return EmbeddedRegistry(root, extra_config=extra)
