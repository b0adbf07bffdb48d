"""Registry authentication: docker `config.json` credentials, Basic and Bearer-token challenges.

Hand-written because no maintained asyncio OCI client fits a daemon that needs ranged, streaming
blob reads on its own aiohttp session; the token flow is small (Distribution's token spec).
Secrets never appear in logs or error messages.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog

from converter.format import untrusted
from converter.format.errors import AuthError, ConfigError, RegistryUnreachableError

log = structlog.get_logger(__name__)
_PARAM = re.compile(r'(\w+)="([^"]*)"')
MAX_TOKEN_BYTES = 1 << 20  # a token answer is a few KiB


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)  # an OAuth2 refresh token for the token server
    registry_token: str | None = field(default=None, repr=False)  # a bearer token sent as it is
    source: str = ""  # where they came from, for error messages
    expires: float = math.inf  # time.monotonic() after which they are not used

    def basic_header(self) -> str | None:
        if self.username is None or self.password is None:
            return None
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    @property
    def kind(self) -> str:
        """Which form they are (for logs; never the values)."""
        if self.registry_token:
            return "registry_token"
        if self.identity_token:
            return "identity_token"
        return "basic"


class CredentialSource(Protocol):
    """Credentials handed over at run time (converter/registry/credential_store.py), asked before
    docker's config.json."""

    def lookup(self, registry: str, repository: str) -> Credentials | None:
        """Live credentials for `repository` on `registry`, or None."""
        ...

    def explain(self, registry: str, repository: str) -> str | None:
        """Why there are none when there were some (expired, refused), for an error message."""
        ...


def docker_config_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("DOCKER_CONFIG"):
        return Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _auth_keys(registry: str) -> list[str]:
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        keys += ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
    return keys


def load_credentials(registry: str, explicit_path: str | None) -> Credentials | None:
    """Credentials for `registry` from a docker config.json, or None if it has none."""
    path = docker_config_path(explicit_path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        if explicit_path:
            raise ConfigError(f"docker config {path} does not exist") from None
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"docker config {path} is unreadable: {exc}") from None
    auths = config.get("auths") if isinstance(config, dict) else None
    entries = auths if isinstance(auths, dict) else {}
    for key in _auth_keys(registry):
        entry = entries.get(key)
        if not isinstance(entry, dict):
            continue
        where = f"{path} ({key})"
        if entry.get("identitytoken"):
            return Credentials(username=entry.get("username"), identity_token=entry["identitytoken"], source=where)
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ConfigError(f"docker config {where}: 'auth' is not base64 user:password") from None
            return Credentials(user, password, source=where)
        if entry.get("username") is not None:
            return Credentials(entry.get("username"), entry.get("password", ""), source=where)
    helpers = (config.get("credHelpers") or {}) if isinstance(config, dict) else {}
    if registry in helpers or (isinstance(config, dict) and config.get("credsStore")):
        log.warning("credential_helper_unsupported", registry=registry, config=str(path))
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="…",service="…"` → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM.findall(rest))


def _repository(scope: str) -> str:
    """The repository of a request's scope, "repository:team/app:pull …" → "team/app"."""
    first = scope.split(" ", 1)[0]
    kind, _, rest = first.partition(":")
    return rest.rpartition(":")[0] if kind == "repository" else ""


def _basic_key(scope: str) -> str:
    return f"basic {_repository(scope)}"


class Authenticator:
    """Answers 401 challenges and remembers the resulting Authorization header per registry+scope,
    never longer than the credentials it came from live (nor past a changed credential)."""

    def __init__(self, session: aiohttp.ClientSession, docker_config: str | None,
                 source: CredentialSource | None = None) -> None:
        self._session = session
        self._docker_config = docker_config
        self.source = source
        self._creds: dict[str, Credentials | None] = {}
        # (registry, scope) → (header, expiry, the credentials it came from)
        self._headers: dict[tuple[str, str], tuple[str, float, Credentials | None]] = {}

    def credentials(self, registry: str, repository: str = "") -> Credentials | None:
        if self.source is not None and (handed := self.source.lookup(registry, repository)) is not None:
            return handed
        if registry not in self._creds:
            self._creds[registry] = load_credentials(registry, self._docker_config)
        return self._creds[registry]

    def describe(self, registry: str, repository: str = "") -> str:
        creds = self.credentials(registry, repository)
        if creds:
            return f"credentials from {creds.source}"
        why = self.source.explain(registry, repository) if self.source is not None else None
        return f"no credentials (anonymous): {why}" if why else "no credentials (anonymous)"

    def header(self, registry: str, scope: str) -> str | None:
        # a Basic header serves every scope of its repository; a token only the scope it was issued for
        for key in ((registry, scope), (registry, _basic_key(scope))):
            cached = self._headers.get(key)
            if cached is None:
                continue
            header, expiry, creds = cached
            if expiry > time.monotonic() and self.credentials(registry, _repository(scope)) == creds:
                return header
            del self._headers[key]
        return None

    async def answer(self, registry: str, scope: str, challenge: str, sent: str | None = None) -> bool:
        """Obtain credentials for a 401 challenge to a request that carried `sent` (its Authorization
        header, or None); False when there is nothing new to try."""
        current = self.header(registry, scope)
        if current is not None and current != sent:
            return True  # another request obtained credentials meanwhile: retry with those
        scheme, params = parse_challenge(challenge)
        creds = self.credentials(registry, _repository(scope))
        limit = creds.expires if creds else math.inf
        if scheme == "basic":
            header = creds.basic_header() if creds else None
            if header is None or header == sent:
                return False
            self._headers[(registry, _basic_key(scope))] = (header, limit, creds)
            return True
        if scheme == "bearer" and creds and creds.registry_token:
            header = f"Bearer {creds.registry_token}"
            if header == sent:
                return False
            self._headers[(registry, scope)] = (header, limit, creds)
            return True
        if scheme == "bearer" and "realm" in params:
            token, ttl = await self._fetch_token(registry, params, scope, creds)
            expiry = min(limit, time.monotonic() + max(10.0, ttl - 10.0))
            self._headers[(registry, scope)] = (f"Bearer {token}", expiry, creds)
            return True
        return False

    async def _fetch_token(
        self, registry: str, params: dict[str, str], scope: str, creds: Credentials | None
    ) -> tuple[str, float]:
        realm = params["realm"]
        scopes = [s for s in {params.get("scope", ""), *scope.split(" ")} if s]
        query: list[tuple[str, str]] = [("service", params["service"])] if "service" in params else []
        query += [("scope", s) for s in sorted(scopes)]
        try:
            if creds and creds.identity_token:
                form = dict(query, grant_type="refresh_token", refresh_token=creds.identity_token, client_id="peerpull")
                form["scope"] = " ".join(sorted(scopes))
                resp = await self._session.post(realm, data=form)
            else:
                headers = {"Authorization": h} if creds and (h := creds.basic_header()) else {}
                resp = await self._session.get(realm, params=query, headers=headers)
            async with resp:
                if resp.status in (401, 403):
                    raise AuthError(f"token server {realm} refused {self.describe(registry, _repository(scope))} for {registry}")
                if resp.status != 200:
                    raise AuthError(f"token server {realm} answered HTTP {resp.status} for {registry}")
                raw = b""
                while len(raw) <= MAX_TOKEN_BYTES and (block := await resp.content.read(1 << 16)):
                    raw += block
                if len(raw) > MAX_TOKEN_BYTES:
                    raise AuthError(f"token server {realm} sent an answer larger than {MAX_TOKEN_BYTES >> 10} KiB")
                body = untrusted.loads(raw)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise RegistryUnreachableError(f"cannot reach token server {realm}: {reason}") from None
        except ValueError:
            raise AuthError(f"token server {realm} sent a malformed answer") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            raise AuthError(f"token server {realm} sent no token")
        ttl = body.get("expires_in", 60)
        return token, float(ttl) if isinstance(ttl, (int, float)) else 60.0
