"""The one typed configuration object: defaults < TOML file < environment < command-line flags.

Each subsystem gets only its own frozen section. Environment variables are named
`PEERPULL_<SECTION>_<FIELD>` (e.g. `PEERPULL_REGISTRY_INSECURE_HOSTS=reg.local:5000,other:5000`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from converter.config import ConvertConfig
from converter.errors import ConfigError
from converter.registry.config import RegistryConfig
from peer.config import PeerConfig
from snapshotter.config import PREFETCH_MODES, SnapshotterConfig

DEFAULT_CONFIG_PATH = "/etc/peerpull/config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto: console on a terminal, JSON otherwise; or "console" / "json"


@dataclass(frozen=True)
class PeerpullConfig:
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    snapshotter: SnapshotterConfig = field(default_factory=SnapshotterConfig)
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
    out: dict[str, dict[str, str]] = {}
    for f in dataclasses.fields(PeerpullConfig):
        hints = _section_types(typing.get_type_hints(PeerpullConfig)[f.name])
        for key in hints:
            name = f"PEERPULL_{f.name}_{key}".upper()
            if name in environ:
                out.setdefault(f.name, {})[key] = environ[name]
    return out


def validate(config: PeerpullConfig) -> PeerpullConfig:
    """Check cross-field rules once, at start-up."""
    from converter import format as fmt

    c = config.convert
    if not fmt.MIN_CHUNK_SIZE <= c.chunk_size <= fmt.MAX_CHUNK_SIZE:
        raise ConfigError(f"convert.chunk_size must be between {fmt.MIN_CHUNK_SIZE} and {fmt.MAX_CHUNK_SIZE}")
    if not 1 <= c.compression_level <= 22:
        raise ConfigError("convert.compression_level must be between 1 and 22")
    if c.jobs < 1:
        raise ConfigError("convert.jobs must be at least 1")
    if config.log.level not in LOG_LEVELS:
        raise ConfigError(f"log.level must be one of {', '.join(LOG_LEVELS)}")
    if config.log.format not in ("auto", "console", "json"):
        raise ConfigError("log.format must be auto, console or json")
    p = config.peer
    if p.discovery not in ("zeroconf", "static", "dns", "none"):
        raise ConfigError("peer.discovery must be zeroconf, static, dns or none")
    if not 0 <= p.listen_port < 65536 or p.cache_max_bytes < (64 << 20):
        raise ConfigError("peer.listen_port must be a port number and peer.cache_max_bytes at least 64 MiB")
    if min(p.origin_max_inflight, p.prefetch_parallel, p.max_concurrent_serves) < 1:
        raise ConfigError("peer concurrency limits must be at least 1")
    s = config.snapshotter
    if s.prefetch not in PREFETCH_MODES:
        raise ConfigError(f"snapshotter.prefetch must be one of {', '.join(PREFETCH_MODES)}")
    if not s.name or s.memory_cache_bytes < (16 << 20) or s.fuse_max_tasks < 8:
        raise ConfigError("snapshotter.name must be set, memory_cache_bytes at least 16 MiB, fuse_max_tasks at least 8")
    if config.registry.retries < 0:
        raise ConfigError("registry.retries must be 0 or more")
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
