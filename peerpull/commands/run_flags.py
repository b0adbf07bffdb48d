"""`peerpull run`'s docker/nerdctl flags, checked before any work and turned into RunOptions fields.

Every mistake is one ConfigError line (exit 2) naming the flag; nothing here starts a process
except the GPU check (nvidia-smi, only when --gpus is given and the toolkit is present).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from converter.format.errors import ConfigError
from peerpull.testbed.runner import resolve_gpus

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ENV_KEY = re.compile(r"^[^=\s]+$")


@dataclass
class ContainerFlags:
    env: list[str] = field(default_factory=list)
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)
    net_host: bool = True
    ports: list[int] = field(default_factory=list)
    gpus: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, printed before the run


def parse_env(items: list[str], environ: dict[str, str]) -> list[str]:
    """K=V as given; K alone takes this process's $K and is skipped when unset (as docker does)."""
    out = []
    for item in items:
        key, eq, _ = item.partition("=")
        if not _ENV_KEY.match(key):
            raise ConfigError(f"-e {item!r}: give K=V (a name without spaces, then =)")
        if eq:
            out.append(item)
        elif key in environ:
            out.append(f"{key}={environ[key]}")
    return out


def parse_volume(item: str) -> tuple[str, str, bool]:
    parts = item.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ConfigError(f"-v {item}: give HOST:CTR or HOST:CTR:ro")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise ConfigError(f"-v {item}: the mode must be ro or rw, not {mode!r}")
    host, ctr = Path(parts[0]).resolve(), parts[1]
    if not host.exists():
        raise ConfigError(f"-v {item}: {host} does not exist on the host")
    if not ctr.startswith("/"):
        raise ConfigError(f"-v {item}: the container path must be absolute")
    return str(host), ctr, mode == "ro"


def parse_port(item: str) -> int:
    """`[IP:]HOST:CTR[/tcp]` or `PORT`: the host port; it must equal the container's (no CNI)."""
    spec, _, proto = item.partition("/")
    if proto not in ("", "tcp"):
        raise ConfigError(f"-p {item}: only tcp ports can be checked")
    parts = spec.rsplit(":", 2)
    try:
        numbers = [int(p) for p in parts[-2:]] if len(parts) > 1 else [int(parts[0])] * 2
    except ValueError:
        raise ConfigError(f"-p {item}: give HOST:CTR (port numbers)") from None
    host, ctr = numbers
    if not (0 < host < 65536 and 0 < ctr < 65536):
        raise ConfigError(f"-p {item}: ports are 1..65535")
    if host != ctr:
        raise ConfigError(f"-p {item}: without a CNI the container shares the host's network and cannot remap "
                          f"ports; use -p {ctr}:{ctr}")
    return host


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"-p {port}: port {port} is already in use on the host") from None
            raise ConfigError(f"-p {port}: cannot check the port ({exc.strerror})") from None


def container_options(args: argparse.Namespace) -> ContainerFlags:
    flags = ContainerFlags(env=parse_env(args.env, dict(os.environ)),
                           mounts=[parse_volume(v) for v in args.volume])
    if args.name and not _NAME.match(args.name):
        raise ConfigError(f"--name {args.name!r}: use letters, digits, '_', '.', '-' (starting with a letter or digit)")
    if args.network == "none":
        if args.net_host or args.publish:
            raise ConfigError("--network none contradicts --net-host" if args.net_host else
                              "--network none contradicts -p: without a CNI, -p means the host network")
        if args.benchmark_mode == "readiness":
            raise ConfigError("--network none: the readiness endpoint could not be reached from the host")
        flags.net_host = False
    if args.publish:
        flags.ports = [parse_port(p) for p in args.publish]
        for port in flags.ports:
            check_port_free(port)
        flags.notes.append("-p: no CNI here, so the container runs on the host network; ports "
                           f"{', '.join(map(str, flags.ports))} were checked free and are probed until they answer")
    if args.gpus is not None:
        flags.gpus = resolve_gpus(args.gpus)
    return flags
