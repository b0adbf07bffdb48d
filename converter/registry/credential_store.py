"""Registry credentials handed to the daemon at run time (kubelet's CRI `PullImage` AuthConfig),
kept in memory only, per repository and per registry host, each with an expiry.

A pull's credentials are stored under its repository and under its host: a lazy read of that image
finds the repository's entry; another repository of the same registry (a startup profile, a blob
mounted across repositories) falls back to the host's. Each pull renews both; a pull containerd
refuses for authentication drops them. Nothing here is written to disk or logged: `Credentials`
hides its secrets from repr, and log events carry the registry and repository only.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from converter.format.errors import ConfigError
from converter.registry.auth import Credentials, CredentialSource
from converter.registry.reference import ImageReference

log = structlog.get_logger(__name__)

HOST = ""  # the repository key of a registry host's entry
__all__ = ["AuthConfig", "CredentialSource", "CredentialStore"]


@dataclass(frozen=True)
class AuthConfig:
    """The four forms of CRI's AuthConfig (runtime.v1): user/password, `auth` (base64
    "user:password"), an identity (refresh) token, a registry (bearer) token."""

    username: str = ""
    password: str = ""
    auth: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def credentials(self, source: str, expires: float) -> Credentials | None:
        """The credentials these fields give, or None when all are empty (an anonymous pull).
        Raises ValueError when `auth` is not base64 "user:password"."""
        if self.registry_token:
            return Credentials(username=self.username or None, registry_token=self.registry_token,
                               source=source, expires=expires)
        if self.identity_token:
            return Credentials(username=self.username or None, identity_token=self.identity_token,
                               source=source, expires=expires)
        if self.auth:
            user, sep, password = base64.b64decode(self.auth, validate=True).decode().partition(":")
            if not sep:
                raise ValueError("auth is not base64 user:password")
            return Credentials(user, password, source=source, expires=expires)
        if self.username:
            return Credentials(self.username, self.password, source=source, expires=expires)
        return None


class CredentialStore:
    """A CredentialSource: `store.put("registry:5000/team/app:1", AuthConfig(...))` at each pull; the registry client's
    Authenticator calls `lookup` (a CredentialSource)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[tuple[str, str], Credentials] = {}
        self._gone: dict[tuple[str, str], str] = {}  # why an entry is no longer there

    def put(self, image: str, auth: AuthConfig) -> Credentials | None:
        """Keep (or renew) the credentials of a pull of `image`; None for an anonymous pull.
        Raises ValueError on a malformed `auth` field or image reference."""
        ref = _parse(image)
        creds = auth.credentials(f"CRI PullImage of {ref.registry}/{ref.repository}", self._clock() + self._ttl_s)
        if creds is None:
            return None
        for key in ((ref.registry, ref.repository), (ref.registry, HOST)):
            self._entries[key] = creds
            self._gone.pop(key, None)
        log.info("registry_credentials_stored", registry=ref.registry, repository=ref.repository,
                 kind=creds.kind, ttl_s=self._ttl_s)
        return creds

    def drop(self, image: str, reason: str, creds: Credentials | None = None) -> None:
        """Forget the credentials of `image` (its repository's, and the host's if they are the same);
        with `creds`, only if those are still the ones kept (a later pull may have renewed them)."""
        try:
            ref = _parse(image)
        except ValueError:
            return
        if creds is not None and self._entries.get((ref.registry, ref.repository)) != creds:
            return
        mine = self._entries.pop((ref.registry, ref.repository), None)
        if mine is not None and self._entries.get((ref.registry, HOST)) == mine:
            del self._entries[(ref.registry, HOST)]
            self._gone[(ref.registry, HOST)] = reason
        if mine is not None:
            self._gone[(ref.registry, ref.repository)] = reason
            log.warning("registry_credentials_dropped", registry=ref.registry, repository=ref.repository, reason=reason)

    def lookup(self, registry: str, repository: str) -> Credentials | None:
        now = self._clock()
        expired: list[tuple[str, str]] = []
        found = None
        for key in ((registry, repository), (registry, HOST)):
            creds = self._entries.get(key)
            if creds is not None and creds.expires <= now:
                del self._entries[key]
                self._gone[key] = f"{creds.source} expired after {self._ttl_s:g} s; the next pull of the image renews them"
                expired.append(key)
            elif creds is not None:
                found = creds
                break
        if expired:  # one line however many entries went
            log.warning("registry_credentials_expired", registry=registry, repository=repository,
                        ttl_s=self._ttl_s, renewed_by="the next pull of the image")
        return found

    def explain(self, registry: str, repository: str) -> str | None:
        return self._gone.get((registry, repository)) or self._gone.get((registry, HOST))

    def __len__(self) -> int:
        """Live entries (repositories and hosts)."""
        now = self._clock()
        return sum(1 for c in self._entries.values() if c.expires > now)



def _parse(image: str) -> ImageReference:
    try:
        return ImageReference.parse(image)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
