"""The `peerpull` command: argument parsing, one error seam, exit codes.

Every `PeerpullError` becomes one line on stderr and its stable exit code; anything else is an
internal error (exit 70) whose traceback appears only with `--debug`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from converter.format.errors import PeerpullError
from peerpull import __version__, exit_codes
from peerpull.commands import (
    build_cmd,
    clean_cmd,
    containerd_config_cmd,
    convert_cmd,
    daemon_cmd,
    doctor_cmd,
    fd_holder_cmd,
    inspect_cmd,
    peer_cmd,
    profile_cmd,
    pull_cmd,
    quickstart_cmd,
    run_cmd,
    status_cmd,
    warm_cmd,
)
from peerpull.config import LOG_FORMATS, LOG_LEVELS, PeerpullConfig, load_config
from peerpull.logs import configure_logging

EXIT_INTERNAL = exit_codes.INTERNAL
EXIT_INTERRUPTED = exit_codes.INTERRUPTED


def _global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """The same options before or after the subcommand; after it they must not reset the defaults."""
    d = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    g = parser.add_argument_group("global options")
    g.add_argument("--config", metavar="FILE", default=d(None),
                   help="TOML config file (default: $PEERPULL_CONFIG or /etc/peerpull/config.toml if present)")
    g.add_argument("--log-level", choices=LOG_LEVELS, default=d(None),
                   help="log verbosity (default: info)")
    g.add_argument("--log-format", choices=LOG_FORMATS, default=d(None),
                   help="log format; auto = console on a terminal, JSON otherwise")
    g.add_argument("--insecure-registry", metavar="HOST[:PORT]", action="append", default=d([]),
                   help="use plain HTTP for this registry (repeatable); loopback registries always use plain HTTP")
    g.add_argument("--docker-config", metavar="FILE", default=d(None),
                   help="docker config.json with registry credentials "
                   "(default: $DOCKER_CONFIG/config.json or ~/.docker/config.json)")
    g.add_argument("--platform", metavar="OS/ARCH", default=d(None),
                   help="platform picked from multi-platform images (default: linux/amd64); when given, a "
                   "single-platform image must be of this platform")
    g.add_argument("--debug", action="store_true", default=d(False), help="show a traceback on internal errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peerpull",
        description="Start huge container images in seconds: convert images to seekable zstd layers, "
        "serve them lazily to containerd and share every chunk across the cluster.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=exit_codes.epilog(),
    )
    parser.add_argument("--version", action="version", version=f"peerpull {__version__}")
    _global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (convert_cmd, build_cmd, inspect_cmd, daemon_cmd, pull_cmd, run_cmd, clean_cmd, peer_cmd,
                   warm_cmd, containerd_config_cmd, quickstart_cmd, profile_cmd, fd_holder_cmd, doctor_cmd,
                   status_cmd):
        sub = module.add_parser(commands)
        _global_options(sub, top=False)
    return parser


def _flags_to_config(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    flags: dict[str, dict[str, Any]] = {"registry": {}, "convert": {}, "peer": {}, "snapshotter": {}, "log": {}}
    if args.insecure_registry:
        flags["registry"]["insecure_hosts"] = tuple(args.insecure_registry)
    for section, key, attr in (
        ("registry", "docker_config", "docker_config"), ("registry", "platform", "platform"),
        ("log", "level", "log_level"), ("log", "format", "log_format"),
        ("convert", "chunk_size", "chunk_size"), ("convert", "compression_level", "level"),
        ("convert", "jobs", "jobs"), ("convert", "work_dir", "work_dir"),
        ("convert", "format_version", "format_version"),
        ("peer", "node_id", "node_id"), ("peer", "cache_dir", "cache_dir"), ("peer", "cache_max_bytes", "cache_size"),
        ("snapshotter", "root", "root"), ("snapshotter", "socket", "socket"), ("snapshotter", "prefetch", "prefetch"),
        ("snapshotter", "stream", "stream"),
        ("snapshotter", "containerd_address", "address"), ("snapshotter", "namespace", "namespace"),
        ("peer", "discovery", "discovery"), ("peer", "dns_name", "dns_name"), ("peer", "advertise_host", "advertise"),
    ):
        value = getattr(args, attr, None)
        if value is not None:
            flags[section][key] = value
    if getattr(args, "peers", None):
        flags["peer"]["static_peers"] = tuple(args.peers)
    if getattr(args, "listen", None):
        flags["peer"]["listen_host"], flags["peer"]["listen_port"] = args.listen
    return flags


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    ours = [e for e in leaves if isinstance(e, (PeerpullError, KeyboardInterrupt))]
    return (ours or leaves or [group])[0]


def _json_errors(args: argparse.Namespace, config: PeerpullConfig | None) -> bool:
    chosen = (config.log.format if config is not None else None) or getattr(args, "log_format", None) or "auto"
    return chosen == "json" or (chosen == "auto" and not sys.stderr.isatty())


def report_error(message: str, code: int, as_json: bool) -> None:
    """The final line of a failed command, alone, in the log format in use."""
    sys.stderr.flush()
    if as_json:
        line = json.dumps({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": "error",
                           "event": "command_failed", "error": message, "exit_code": code})
    else:
        line = f"peerpull: error: {message}"
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after the first "--" is for the container (`peerpull run IMAGE -- cmd args`)
    trailing: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, trailing = argv[:at], argv[at + 1:]
    args = parser.parse_args(argv)
    args.trailing = trailing
    config: PeerpullConfig | None = None
    try:
        config = load_config(args.config, _flags_to_config(args))
        configure_logging(config.log)
        handler: Callable[[argparse.Namespace, PeerpullConfig], Any] = args.handler
        try:
            return int(asyncio.run(handler(args, config)) or 0)
        except BaseExceptionGroup as group:  # from TaskGroups: report the first real cause
            raise _first_cause(group) from None
    except PeerpullError as exc:
        code = exit_codes.exit_code(exc)
        report_error(" ".join(str(exc).split()), code, _json_errors(args, config))
        return code
    except KeyboardInterrupt:
        report_error("interrupted", EXIT_INTERRUPTED, _json_errors(args, config))
        return EXIT_INTERRUPTED
    except Exception as exc:  # the one place unexpected errors are turned into a line
        if args.debug:
            raise
        report_error(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
                     "(run again with --debug for details)", EXIT_INTERNAL, _json_errors(args, config))
        return EXIT_INTERNAL

