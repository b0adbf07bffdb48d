"""`peerpull run IMAGE`: start a container lazily (or normally, for comparison) and time it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from converter.format.errors import ConfigError
from peerpull.commands.run_flags import container_options
from peerpull.config import PeerpullConfig
from peerpull.run_plot import plot_runs, require_matplotlib
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

--mode both runs it normally and then lazily (each on a private set-up of its own, or both on
--address), for a side-by-side table and plot; --json then writes a list of both results.

Arguments after `--` replace the image's Cmd (its Entrypoint stays), as in Kubernetes.

Container flags as docker/nerdctl take them: -e/--env K=V (K alone passes this shell's $K),
-v/--volume HOST:CTR[:ro] (a bind mount; HOST must exist), --name NAME (the container's id; on
--address it must not exist yet), --rm (remove the container and its snapshot when it exits; a
private set-up is removed whole anyway). --gpus all|N|device=I[,J] goes through containerd's
NVIDIA hook: it needs the NVIDIA container toolkit (nvidia-container-runtime-hook or nvidia-ctk,
with nvidia-container-cli and nvidia-smi) and says which is missing otherwise.
Networking: there is no CNI here, so the container shares the host's network (as --net-host;
the flag is accepted for nerdctl compatibility) unless --network none gives it a namespace with
only loopback. -p/--publish HOST:CTR therefore implies the host network: ports cannot be
remapped (HOST must equal CTR), run checks the port is free before starting and reports when it
first accepts connections.

The summary block gives the time to pull, to the container's start, to its first log line and to
ready/complete, and the bytes by tier. --plot FILE.png draws the timeline of the run(s) and the
bytes each tier served over time (the daemon's /metrics sampled every 0.25 s; a normal pull's
download appears when it ends); --compare FILE adds runs saved earlier with --json to the table
and the plot (needs matplotlib: the bench extra).

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
  peerpull run -e MODEL=/models/x -v /srv/models:/models:ro --name infer --rm IMAGE
  peerpull run --gpus all -p 8000:8000 --benchmark-mode readiness --readiness-endpoint http://127.0.0.1:8000/ IMAGE
  peerpull run --mode both --plot startup.png IMAGE
  peerpull run IMAGE --json lazy.json; peerpull run --mode normal IMAGE --compare lazy.json --plot both.png
"""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    p = commands.add_parser("run", usage="peerpull run [options] IMAGE [-- ARG ...]", help="start a container lazily (or normally) and report timings and bytes by tier",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image reference")
    p.add_argument("--mode", choices=("lazy", "normal", "both"), default="lazy",
                   help="lazy (peerpull), normal (overlayfs pull) or both, one after the other")
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
    c = p.add_argument_group("container (docker/nerdctl flags)")
    c.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="set an environment variable (repeatable)")
    c.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CTR[:ro]",
                   help="bind-mount a host path (repeatable)")
    c.add_argument("--net-host", action="store_true", help="share the host's network (the default here: no CNI)")
    c.add_argument("--network", choices=("host", "none"), default=None, help="host (default) or none (loopback only)")
    c.add_argument("-p", "--publish", action="append", default=[], metavar="HOST:CTR",
                   help="no CNI: implies the host network, HOST must equal CTR; checks the port is free and when it answers")
    c.add_argument("--gpus", metavar="all|N|device=I", help="GPUs through the NVIDIA container toolkit")
    c.add_argument("--name", metavar="NAME", default="", help="the container's name (default a generated one)")
    c.add_argument("--rm", action="store_true", help="remove the container when it exits")
    o = p.add_argument_group("output")
    o.add_argument("--plot", metavar="FILE.png", help="draw the timeline and bytes by tier over time")
    o.add_argument("--compare", action="append", default=[], metavar="FILE.json",
                   help="a run saved with --json to show beside this one (repeatable)")
    p.set_defaults(handler=run)
    return p


def print_summary(r: RunResult, console: Console) -> None:
    """The fastpull-style block of one run."""
    t = r.bytes_by_tier

    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    ready = "ready" if r.ready_s is not None and r.exit_code is None else "complete"
    rows = [("image", r.image), ("mode", r.mode_summary), ("time to pull", s(r.pull_s)),
            ("time to start", s(r.start_s)), ("time to first log", s(r.first_log_s)),
            (f"time to {ready}", s(r.ready_s)), ("exit code", "-" if r.exit_code is None else str(r.exit_code)),
            ("bytes from cache", f"{t.get('cache', 0) / 1e6:.1f} MB"),
            ("bytes from peers", f"{t.get('peer', 0) / 1e6:.1f} MB"),
            ("bytes from registry (lazy)", f"{t.get('origin', 0) / 1e6:.1f} MB"),
            ("downloaded in full", f"{t.get('download', 0) / 1e6:.1f} MB"),
            ("registry wire bytes", f"{r.registry_wire_bytes / 1e6:.1f} MB")]
    for port, at in r.ports_reachable_s.items():
        rows.append((f"port {port} answered", s(at) if at is not None else "never"))
    if r.container:
        rows.append(("container", f"{r.container} ({'removed' if r.removed else 'kept'})"))
    width = max(len(k) for k, _ in rows)
    console.print(f"=== peerpull run: {r.mode} ===", markup=False, highlight=False)
    for key, value in rows:
        console.print(f"{key:<{width}}  {value}", markup=False, highlight=False)


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


def check_writable(path: str, flag: str = "--json") -> None:
    """Fail before any work if `--json FILE` (or `--plot FILE`) cannot be written (not after the run)."""
    target = Path(path)
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
        if not existed:
            target.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write it ({exc.strerror}); give a writable path"
                          + (" or -" if flag == "--json" else "")) from None


def global_args(args: argparse.Namespace, config: PeerpullConfig) -> list[str]:
    """The global options a child peerpull needs besides the [registry] section (passed as env)."""
    out = ["--log-level", config.log.level]
    if args.config:
        out += ["--config", args.config]
    return out


def _compared(paths: list[str]) -> list[RunResult]:
    """Runs saved earlier with --json (one object or a list of them)."""
    known = {f.name for f in dataclasses.fields(RunResult)}
    out = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--compare {path}: cannot read a --json result ({exc})") from None
        for item in data if isinstance(data, list) else [data]:
            if not isinstance(item, dict) or "mode" not in item or "image" not in item:
                raise ConfigError(f"--compare {path}: not a `peerpull run --json` result")
            out.append(RunResult(**{k: v for k, v in item.items() if k in known}))
    return out


async def run(args: argparse.Namespace, config: PeerpullConfig) -> int:
    flags = container_options(args)
    if args.json and args.json != "-":
        check_writable(args.json)
    if args.plot:
        require_matplotlib()
        check_writable(args.plot, "--plot")
    earlier = _compared(args.compare)
    console = Console(stderr=args.json == "-", width=None if sys.stdout.isatty() else 140)
    for note in flags.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    echo = (lambda text: None) if args.quiet else (lambda text: console.print(f"[dim]│[/] {text}", markup=True,
                                                                               highlight=False))
    results = []
    for mode in ("normal", "lazy") if args.mode == "both" else (args.mode,):
        opts = RunOptions(image=args.image, mode=mode, benchmark_mode=args.benchmark_mode,
                          readiness_endpoint=args.readiness_endpoint, args=list(args.trailing), address=args.address,
                          namespace=args.run_namespace, snapshotter=config.snapshotter.name,
                          daemon_metrics=args.daemon_metrics, timeout_s=args.timeout,
                          work_dir=(str(Path(args.work_dir) / mode) if args.work_dir and args.mode == "both"
                                    else args.work_dir),
                          keep=args.keep, global_args=global_args(args, config), env=flags.env, mounts=flags.mounts,
                          net_host=flags.net_host, ports=flags.ports, gpus=flags.gpus, name=args.name, rm=args.rm,
                          sample_every_s=0.25 if args.plot else 0.0)
        results.append(await run_image(opts, config.registry, echo))
    for result in results:
        print_summary(result, console)
    if len(results) + len(earlier) > 1:
        print_results([*earlier, *results], console)
    elif results[0].fallback_layers:
        print_results(results, console)
    if args.plot:
        plot_runs([r.as_dict() for r in [*earlier, *results]], Path(args.plot), f"peerpull run {args.image}")
        console.print(f"plot written to {args.plot}", markup=False, highlight=False)
    if args.json:
        data: Any = results[0].as_dict() if len(results) == 1 else [r.as_dict() for r in results]
        text = json.dumps(data, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    ok = all(r.exit_code in (0, None) for r in results) or args.benchmark_mode == "readiness"
    return 0 if ok else 1
