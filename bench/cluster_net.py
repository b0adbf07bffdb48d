"""The network of a simulated cluster: one namespace per node and one for the registry, all on a
Linux bridge in the host namespace (which gets .254, so the bench reaches every node), each
joined by a veth pair shaped with tc tbf in both directions (the namespace side limits what the
namespace sends, the bridge side what it receives).

Every ip/tc command is checked and every qdisc read back, so a run never goes unshaped without
saying so. Names start with `p4` plus a random tag (several runs and helpers at once); the
subnet is a random 10.x.y.0/24 not already routed here. Leaving the context (any exit) kills what
still runs inside the namespaces (only this bench's processes live there) and deletes them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field

REGISTRY_INDEX = 200  # the registry's host number in the subnet; nodes are 1..N, the host .254


def run(*cmd: str) -> str:
    """Run a command; any failure ends the bench with the command and its error."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def _free_subnet() -> str:
    """A 10.x.y prefix no route on this host covers."""
    routes = run("ip", "-4", "route", "show", "table", "all")
    for _ in range(100):
        prefix = f"10.{random.randint(160, 250)}.{random.randint(0, 255)}"
        if f"{prefix}." not in routes:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet found")


@dataclass
class Link:
    """One namespace's veth pair: `host_if` on the bridge, `ns_if` inside `ns` at `address`."""

    ns: str
    host_if: str
    ns_if: str
    address: str

    def counters(self) -> tuple[int, int]:
        """(bytes the namespace sent, bytes it received) on its link so far."""
        data = json.loads(run("ip", "-n", self.ns, "-j", "-s", "link", "show", "dev", self.ns_if))[0]
        stats = data["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])


@dataclass
class ClusterNet:
    """`nodes` node namespaces and a registry namespace on one bridge; `rate` and `registry_rate` in
    tc syntax (e.g. 200mbit) for every node link and for the registry link."""

    nodes: int
    rate: str
    registry_rate: str
    tag: str = field(default_factory=lambda: f"{random.randrange(16 ** 4):04x}")
    prefix: str = ""
    links: list[Link] = field(default_factory=list)
    registry: Link | None = None
    shaping: list[str] = field(default_factory=list)  # the qdiscs read back, one line per link end
    _made: list[Link] = field(default_factory=list)  # namespaces created, for the teardown

    @property
    def bridge(self) -> str:
        return f"p4{self.tag}br"

    @property
    def host_address(self) -> str:
        return f"{self.prefix}.254"

    def __enter__(self) -> ClusterNet:
        self.prefix = _free_subnet()
        try:
            run("ip", "link", "add", self.bridge, "type", "bridge")
            run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
            self.registry = self._add(f"p4{self.tag}reg", "r", REGISTRY_INDEX, self.registry_rate)
            for i in range(self.nodes):
                self.links.append(self._add(f"p4{self.tag}n{i}", str(i), i + 1, self.rate))
        except BaseException:
            self.__exit__()
            raise
        return self

    def _add(self, ns: str, suffix: str, index: int, rate: str) -> Link:
        host_if, ns_if = f"p4{self.tag}h{suffix}", f"p4{self.tag}e{suffix}"
        run("ip", "netns", "add", ns)
        link = Link(ns, host_if, ns_if, f"{self.prefix}.{index}")
        self._made.append(link)  # before its veth: torn down whatever fails next
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        run("ip", "link", "set", ns_if, "netns", ns)
        run("ip", "link", "set", host_if, "master", self.bridge)
        run("ip", "link", "set", host_if, "up")
        run("ip", "-n", ns, "addr", "add", f"{link.address}/24", "dev", ns_if)
        run("ip", "-n", ns, "link", "set", ns_if, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", ns_if)  # multicast (zeroconf) by the bridge
        for where, dev in ((["-n", ns], ns_if), ([], host_if)):
            run("tc", *where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "50ms")
            shown = run("tc", *where, "qdisc", "show", "dev", dev)
            if "tbf" not in shown:
                raise RuntimeError(f"shaping is not in place on {dev}: {shown.strip()}")
            self.shaping.append(f"{dev}: {shown.strip()}")
        return link

    def __exit__(self, *exc: object) -> None:
        for link in reversed(self._made):
            kill_namespace_processes(link.ns)
            subprocess.run(["ip", "link", "del", link.host_if], capture_output=True)
            subprocess.run(["ip", "netns", "del", link.ns], capture_output=True)
        self._made.clear()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def kill_namespace_processes(ns: str, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, whatever still runs in `ns` (this bench's daemons, containerds, registry:
    nothing else is ever started in its namespaces)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                               text=True).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                             text=True).stdout.split():
            time.sleep(0.1)
