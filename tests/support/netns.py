"""Network namespaces joined by a Linux bridge: several hosts on one machine (needs root, iproute2)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


def netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class BridgedHosts:
    """`count` namespaces ns0..nsN-1 with addresses 10.<net>.0.1.. on one bridge; the root namespace is .254."""

    count: int
    net: int = 77
    tag: str = field(default_factory=lambda: f"pp{os.getpid() % 100000}")
    names: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"br{self.tag}"

    def address(self, index: int) -> str:
        return f"10.{self.net}.0.{index + 1}"

    def __enter__(self) -> BridgedHosts:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"10.{self.net}.0.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.count):
            ns, host_end, ns_end = f"{self.tag}n{i}", f"v{self.tag}{i}", f"e{self.tag}{i}"
            _ip("netns", "add", ns)
            self.names.append(ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", ns_end)
            _ip("-n", ns, "link", "set", ns_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", ns_end)  # multicast leaves by the bridge
        return self

    def __exit__(self, *exc: object) -> None:
        for i, ns in enumerate(self.names):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"v{self.tag}{i}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
