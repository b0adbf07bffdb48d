"""A registry's network namespace, joined to the host by a veth pair whose registry-side egress
(the download direction) is rate-limited with tbf. Every command is checked and the qdisc read
back, so a benchmark never runs unshaped without saying so."""

from __future__ import annotations

import subprocess


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result


class ShapedLink:
    def __init__(self, rate: str, ns: str, host_if: str, ns_if: str, ns_addr: str, host_addr: str) -> None:
        self.rate, self.ns, self.host_if, self.ns_if = rate, ns, host_if, ns_if
        self.ns_addr, self.host_addr = ns_addr, host_addr
        self.shaping = ""

    def __enter__(self) -> ShapedLink:
        self.__exit__()
        ns = self.ns
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{self.host_addr}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.ns_addr}/24", "dev", self.ns_if)
        sh("ip", "-n", ns, "link", "set", self.ns_if, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", self.ns_if, "root", "tbf", "rate", self.rate,
           "burst", "256kb", "latency", "50ms")
        shown = sh("ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", self.ns_if).stdout
        if "tbf" not in shown:
            raise SystemExit(f"shaping is not in place: {shown}")
        self.shaping = f"tbf rate {self.rate}"
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
