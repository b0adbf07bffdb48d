"""`peerpull run IMAGE`: start a container lazily (or normally, for comparison) and time it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from converter.format.errors import ConfigError
from peerpull.config import PeerpullConfig
from peerpull.testbed.runner import RunOptions, RunResult, run_image

DESCRIPTION = """\
Start one container of IMAGE and report how long it took: to the container's start, to the first
line it prints, and to its completion (or to readiness: an HTTP endpoint answering 2xx), with the
bytes fetched by tier (local cache, peers, registry).

--mode lazy (default) pulls with `peerpull pull` and runs on the peerpull snapshotter: layers are
fetched on demand. --mode normal pulls with containerd's own pull and overlayfs, the usual path,
for comparison on the same machine.

Without --address it runs on a private set-up under a temporary directory (its own containerd and
peerpull daemon, cold caches; needs root), removed afterwards unless --keep. With --address it
uses that containerd (and the peerpull daemon wired into it).

Arguments after `--` replace the image's Cmd (its Entrypoint stays), as in Kubernetes.

The global options (--insecure-registry, --docker-config, --platform, --config, --log-level)
reach every process it starts: the private daemon gets the whole [registry] section, containerd's
pull in normal mode gets --plain-http and --platform. A private set-up is marked so that
`peerpull clean` can remove what an interrupted run left behind (and nothing else); --work-dir
must be new or empty.

If any layer was downloaded in full in lazy mode (it fell back: the daemon could not serve it, or
it is not seekable), the table says "lazy (N of M layers fell back)", a warning line names the
reasons, and --json has them in fallback_layers and fallback_reasons; the exit code stays 0. The
bytes by tier include those downloads ("downloaded", part of "registry (wire)").

exit codes: 0 the container ran (exit 0, or readiness reached), 1 the container exited non-zero
or did not finish in time, 2 bad usage (e.g. an unwritable --json path, checked before any work),
others as listed by `peerpull --help`.

examples:
  peerpull run registry.local:5000/ml/torch:seekable
  peerpull run --mode normal registry.local:5000/ml/torch:latest
  peerpull run IMAGE --benchmark-mode readiness --readiness-endpoint http://127.0.0.1:8000/health
  peerpull run IMAGE -- python -c "import torch"
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("run", usage="peerpull run [options] IMAGE [-- ARG ...]", help="start a container lazily (or normally) and report timings and bytes by tier",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image reference")
    p.add_argument("--mode", choices=("lazy", "normal"), default="lazy", help="lazy (peerpull) or normal (overlayfs pull)")
    p.add_argument("--benchmark-mode", choices=("completion", "readiness"), default="completion",
                   help="what 'ready' means: the container exits (default) or an HTTP endpoint answers")
    p.add_argument("--readiness-endpoint", metavar="URL", default="", help="polled with --benchmark-mode readiness")
    p.add_argument("--address", metavar="SOCKET", default="", help="a running containerd (default: a private one)")
    p.add_argument("--namespace", dest="run_namespace", default="peerpull-run", metavar="NS",
                   help="containerd namespace (default peerpull-run)")
    p.add_argument("--daemon-metrics", metavar="URL", default="http://127.0.0.1:7470/metrics",
                   help="metrics of the daemon serving --address (for bytes by tier)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="give up after S seconds (default 600)")
    p.add_argument("--work-dir", metavar="DIR", default="", help="where the private set-up lives (new or empty; default a new dir under /var/tmp/peerpull-run)")
    p.add_argument("--keep", action="store_true", help="keep the private set-up's directory (remove it later with peerpull clean)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE (- for stdout)")
    p.add_argument("--quiet", action="store_true", help="do not echo the container's output")
    p.set_defaults(handler=run)
    return p


def print_results(results: list[RunResult], console: Console) -> None:
    table = Table(title="peerpull run")
    for column in ("mode", "pull", "container start", "first log line", "ready", "exit", "from cache", "from peers",
                   "downloaded", "registry (wire)"):
        table.add_column(column, justify="right" if column != "mode" else "left")

    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    def mb(value: float) -> str:
        return f"{value / 1e6:.1f} MB"

    for r in results:
        t = r.bytes_by_tier
        table.add_row(r.mode_summary, s(r.pull_s), s(r.start_s), s(r.first_log_s), s(r.ready_s), str(r.exit_code),
                      mb(t.get("cache", 0)), mb(t.get("peer", 0)), mb(t.get("download", 0)), mb(r.registry_wire_bytes))
    console.print(table)
    for r in results:
        if r.fallback_layers:
            console.print(f"warning: {r.mode_summary}: downloaded in full instead; "
                          f"{'; '.join(r.fallback_reasons) or 'see the daemon log'}", markup=False, highlight=False)


def check_writable(path: str) -> None:
    """Fail before any work if `--json FILE` cannot be written (not after the run)."""
    target = Path(path)
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
        if not existed:
            target.unlink()
    except OSError as exc:
        raise ConfigError(f"--json {path}: cannot write it ({exc.strerror}); give a writable path or -") from None


def global_args(args: argparse.Namespace, config: PeerpullConfig) -> list[str]:
    """The global options a child peerpull needs besides the [registry] section (passed as env)."""
    out = ["--log-level", config.log.level]
    if args.config:
        out += ["--config", args.config]
    return out


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    opts = RunOptions(image=args.image, mode=args.mode, benchmark_mode=args.benchmark_mode,
                      readiness_endpoint=args.readiness_endpoint, args=list(args.trailing), address=args.address,
                      namespace=args.run_namespace, snapshotter=config.snapshotter.name,
                      daemon_metrics=args.daemon_metrics, timeout_s=args.timeout, work_dir=args.work_dir,
                      keep=args.keep, global_args=global_args(args, config))
    if args.json and args.json != "-":
        check_writable(args.json)
    console = Console(stderr=args.json == "-", width=None if sys.stdout.isatty() else 140)
    echo = (lambda text: None) if args.quiet else (lambda text: console.print(f"[dim]│[/] {text}", markup=True,
                                                                               highlight=False))
    result = await run_image(opts, config.registry, echo)
    print_results([result], console)
    if args.json:
        text = json.dumps(result.as_dict(), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if result.exit_code in (0, None) or opts.benchmark_mode == "readiness" else 1
