"""The one typed configuration object: defaults < TOML file < environment < command-line flags.

Each subsystem gets only its own frozen section. Environment variables are named
`PEERPULL_<SECTION>_<FIELD>` (e.g. `PEERPULL_REGISTRY_INSECURE_HOSTS=reg.local:5000,other:5000`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converter.conversion.config import ConvertConfig
from converter.format.errors import ConfigError
from converter.format.settings import check_section, setting
from converter.registry.config import RegistryConfig
from peer.config import PeerConfig
from snapshotter.config import SnapshotterConfig
from snapshotter.cri.config import CriConfig

DEFAULT_CONFIG_PATH = "/etc/peerpull/config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
ENV_PREFIX = "PEERPULL_"
# names the project's own scripts, benches and tests read; they are not config keys, so they must not
# trip the typo check (exporting PEERPULL_PYTHON for a bench used to stop the daemon from starting)
_OTHER_ENV = frozenset({
    "PEERPULL_CONFIG", "PEERPULL_VENV", "PEERPULL_PYTHON", "PEERPULL_TEST_RUNDIR", "PEERPULL_CONTAINERD_VERSIONS",
    "PEERPULL_CONTAINERD_CACHE",
})
_PLATFORM_RE = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$")


@dataclass(frozen=True)
class LogConfig:
    level: str = setting("info", choices=LOG_LEVELS)
    format: str = setting("auto", choices=LOG_FORMATS)  # auto: console on a terminal, JSON otherwise


@dataclass(frozen=True)
class PeerpullConfig:
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    snapshotter: SnapshotterConfig = field(default_factory=SnapshotterConfig)
    cri: CriConfig = field(default_factory=CriConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a TOML or environment value into the field's declared type, or fail with ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(i.strip() if isinstance(i, str) else i, args[0], where) for i in items if i != "")
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if annotation in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            return annotation(value)
        if annotation is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(value)
            return str(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a valid {getattr(annotation, '__name__', annotation)}") from None
    return value


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(config: PeerpullConfig, overrides: Mapping[str, Mapping[str, Any]], source: str) -> PeerpullConfig:
    sections = {f.name: f for f in dataclasses.fields(PeerpullConfig)}
    updated: dict[str, Any] = {}
    for section_name, values in overrides.items():
        if section_name not in sections:
            raise ConfigError(f"{source}: unknown section [{section_name}] (known: {', '.join(sections)})")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{section_name}] must be a table")
        current = getattr(config, section_name)
        hints = _section_types(type(current))
        changes = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {section_name}.{key} (known: {', '.join(hints)})")
            changes[key] = _coerce(value, hints[key], f"{source}: {section_name}.{key}")
        updated[section_name] = dataclasses.replace(current, **changes)
    return dataclasses.replace(config, **updated)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """`PEERPULL_<SECTION>_<KEY>` variables; any other `PEERPULL_*` name is a mistake (a typo
    such as PEERPULL_PEER_TOKN would otherwise leave a node open without a word)."""
    out: dict[str, dict[str, str]] = {}
    known: dict[str, tuple[str, str]] = {}
    for f in dataclasses.fields(PeerpullConfig):
        for key in _section_types(typing.get_type_hints(PeerpullConfig)[f.name]):
            known[f"{ENV_PREFIX}{f.name}_{key}".upper()] = (f.name, key)
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _OTHER_ENV:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"environment: unknown variable {name}{hint}")
        section, key = known[name]
        out.setdefault(section, {})[key] = value
    return out


def validate(config: PeerpullConfig) -> PeerpullConfig:
    """Check every section's declared bounds and the cross-field rules once, at start-up."""
    for f in dataclasses.fields(PeerpullConfig):
        check_section(getattr(config, f.name), f.name)
    if not config.snapshotter.name:
        raise ConfigError("snapshotter.name must be set")
    if config.registry.platform and not _PLATFORM_RE.match(config.registry.platform):  # "": the default
        raise ConfigError(f"registry.platform must look like os/arch[/variant], e.g. linux/amd64 "
                          f"(got {config.registry.platform!r})")
    return config


def load_config(
    path: str | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> PeerpullConfig:
    """Build the configuration: defaults, then the file, then the environment, then flags."""
    environ = os.environ if environ is None else environ
    config = PeerpullConfig()
    explicit = path or environ.get("PEERPULL_CONFIG")
    file_path = explicit or DEFAULT_CONFIG_PATH
    if explicit or Path(file_path).exists():
        try:
            data = tomllib.loads(Path(file_path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file_path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {file_path}: {exc}") from None
        config = _apply(config, data, file_path)
    config = _apply(config, _env_overrides(environ), "environment")
    if flags:
        config = _apply(config, {k: v for k, v in flags.items() if v}, "command line")
    return validate(config)
