"""`peerpull doctor`: check this node, one line per check with the fix; the exit code says healthy or not."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from converter.format.errors import ConfigError
from peerpull import exit_codes
from peerpull.config import PeerpullConfig
from peerpull.doctor.check import Check, DoctorContext, run_checks
from peerpull.doctor.containerd import check_containerd
from peerpull.doctor.cri import check_cri
from peerpull.doctor.daemon import check_daemon
from peerpull.doctor.fuse import check_fuse
from peerpull.doctor.peers import check_peers
from peerpull.doctor.storage import check_storage

DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
GROUPS: tuple[tuple[str, Check], ...] = (
    ("fuse", check_fuse), ("containerd", check_containerd), ("daemon", check_daemon),
    ("storage", check_storage), ("peers", check_peers), ("cri", check_cri),
)

DESCRIPTION = f"""\
Check this node for what lazy pulls need, one line per check with the fix when it fails:
FUSE (/dev/fuse, fusermount3, the kernel's FUSE protocol, passthrough and resend, read with a
throwaway mount), containerd (its socket and version, and its config.toml wired to this daemon:
the proxy plugin's socket, CRI's snapshotter (the default one or a RuntimeClass handler's) and
snapshot annotations (or containerd 2.1's transfer-service CRI pulls), and for containerd 2.x the
plugin's enable_remote_snapshot_annotations export, a transfer-service unpack entry and a handler's
runtime_platforms entry; for 1.x a declared default runtime), this
daemon (its snapshotter socket answering, its peer server healthy, and with cri.image_proxy its
CRI image socket answering), storage (cache, snapshotter
root and object store on a filesystem that can hold them, with free space), and peers (a cluster
token when listening beyond loopback, static peers answering). Checks read this node's
configuration (--config, PEERPULL_* variables). Needs root for the FUSE checks.

Exit codes: 0 every check passed, {exit_codes.UNHEALTHY} at least one failed, 2 bad usage.

examples:
  peerpull doctor
  peerpull doctor --json | jq '.checks[] | select(.ok | not)'
  peerpull doctor --containerd-config /etc/containerd/config.toml --timeout 5
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("doctor", help="check this node (FUSE, containerd wiring, daemon, storage, peers)",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--containerd-config", metavar="PATH", default=DEFAULT_CONTAINERD_CONFIG,
                   help="containerd's config.toml (default %(default)s)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S",
                   help="per network probe (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help='print {"healthy": bool, "checks": [{"name", "ok", "message"}]}')
    p.set_defaults(handler=run)
    return p


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    if not 0 < args.timeout <= 60:
        raise ConfigError("--timeout must be between 0 and 60 seconds")
    context = DoctorContext(config, Path(args.containerd_config), timeout_s=args.timeout)
    results = await run_checks(context, GROUPS)
    healthy = all(r.ok for r in results)
    if args.json:
        print(json.dumps({"healthy": healthy, "checks": [r.as_dict() for r in results]}, indent=2))
    else:
        width = max(len(r.name) for r in results)
        for r in results:
            print(f"{'ok  ' if r.ok else 'FAIL'} {r.name:<{width}}  {r.message}")
        failed = sum(1 for r in results if not r.ok)
        print(f"{'healthy' if healthy else 'unhealthy'}: {len(results) - failed} of {len(results)} checks passed")
    return exit_codes.OK if healthy else exit_codes.UNHEALTHY
