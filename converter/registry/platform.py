"""Platforms (`os/arch[/variant]`) as indexes and image configs state them, and the choice between them."""

from __future__ import annotations

from typing import Any

from converter.format import untrusted
from converter.format.errors import UnsupportedError


def describe(platform: Any) -> str:
    if not isinstance(platform, dict):
        return "?/?"
    text = f"{platform.get('os') or '?'}/{platform.get('architecture') or '?'}"
    return text + (f"/{platform['variant']}" if platform.get("variant") else "")


def matches(platform: Any, wanted: str) -> bool:
    """True when `platform` (an index entry's or a config's) is `wanted`; a variant is compared only
    when `wanted` names one."""
    if not isinstance(platform, dict):
        return False
    os_, _, rest = wanted.partition("/")
    arch, _, variant = rest.partition("/")
    return (platform.get("os") == os_ and platform.get("architecture") == arch
            and (not variant or platform.get("variant") == variant))


def check_config_platform(config_body: bytes, wanted: str, what: str) -> None:
    """A single-platform image chosen with an explicit platform must be of that platform."""
    try:
        config = untrusted.loads(config_body)
    except (ValueError, UnicodeDecodeError):
        return  # the converter reports a malformed config where it reads it
    if isinstance(config, dict) and not matches(config, wanted):
        raise UnsupportedError(f"{what} has no image for {wanted} (it has: {describe(config)}); "
                               f"choose one of those with --platform")
