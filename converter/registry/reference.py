"""Image references as people type them: `host[:port]/repo/name[:tag][@sha256:...]`."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from converter.format.digest import is_digest
from converter.format.errors import ConfigError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ImageReference:
    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        original = text
        if not text or text != text.strip():
            raise ConfigError(f"invalid image reference {original!r}")
        digest = None
        if "@" in text:
            text, digest = text.split("@", 1)
            if not is_digest(digest):
                raise ConfigError(f"invalid image reference {original!r}: bad digest")
        first, sep, rest = text.partition("/")
        if sep and ("." in first or ":" in first or first.startswith("[") or first == "localhost"):
            registry, path = first, rest
            _check_host(registry, original)
        else:
            registry, path = DOCKER_HUB, text
        tag = None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, tag = path.rsplit(":", 1)
            if not _TAG.match(tag):
                raise ConfigError(f"invalid image reference {original!r}: bad tag {tag!r}")
        if registry == DOCKER_HUB and "/" not in path:
            path = "library/" + path
        if not path or not all(_COMPONENT.match(c) for c in path.split("/")):
            raise ConfigError(f"invalid image reference {original!r}: bad repository name {path!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, path, tag, digest)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        host = self.registry
        if host.startswith("["):
            return host[1:].split("]", 1)[0]
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    @property
    def is_loopback(self) -> bool:
        name = self.hostname
        if name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> ImageReference:
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> ImageReference:
        return replace(self, digest=digest)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def _check_host(registry: str, original: str) -> None:
    """`host[:port]` or `[v6]:port`: a valid name or address and a port in 1..65535."""
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise ConfigError(f"invalid image reference {original!r}: bad registry {registry!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"invalid image reference {original!r}: bad IPv6 address {host!r}") from None
    else:
        host, sep, port_text = registry.partition(":")
        port = port_text if sep else None
        if not _HOST.match(host):
            raise ConfigError(f"invalid image reference {original!r}: bad registry host {host!r}")
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"invalid image reference {original!r}: port {port!r} is not in 1..65535")
