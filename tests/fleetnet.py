"""Simulated hosts for fleet-store root tests: network namespaces on a fabric bridge.

    with Fabric("fl") as fab:
        fab.add_address("10.199.0.11")                  # an etcd member's, in the root ns
        h1 = fab.add_host("h1", 1)                      # ns, fab0 10.199.0.21, wbr0 10.78.1.1/24
        web = h1.add_workload("web", 10)                # ns with eth0 10.78.1.10 on h1's wbr0
        fab.route_all()                                 # each host's subnet via its fabric address

``Fabric(tag, ipv6=True)`` adds IPv6 beside it: fab0 fd00:199::21/64, wbr0
fd00:78:1::1/64, workload ``web`` fd00:78:1::10/64 (``ip6``), IPv6 forwarding, and the
hosts' IPv6 subnets routed too. Without it (the default) nothing has IPv6.

Host ``h`` is namespace FAB+h; its workloads' subnets are routed between hosts without
NAT. Each host gets a bpffs under /run (``ip netns exec`` hides /sys/fs/bpf). Only
names made here are deleted, also after a failure half way.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from netns import bridge_mac, in_netns, run


@dataclass
class Netns:
    ns: str
    ip: str = ""
    ip6: str = ""       # with Fabric(ipv6=True) only

    @property
    def ip4(self) -> str:
        return self.ip

    def socket(self, family=socket.AF_INET, type=socket.SOCK_STREAM, proto=0):
        return in_netns(self.ns, socket.socket, family, type, proto)

    def exec(self, *argv: str, check: bool = True, timeout: float = 10):
        return run("ip", "netns", "exec", self.ns, *argv, check=check, timeout=timeout)


@dataclass
class Host(Netns):
    name: str = ""
    index: int = 0
    fabric: "Fabric | None" = None
    run_dir: Path = Path("/")
    workloads: dict = field(default_factory=dict)

    @property
    def subnet(self) -> str:
        return f"10.78.{self.index}.0/24"

    @property
    def subnet6(self) -> str:
        return f"fd00:78:{self.index}::/64"

    @property
    def bpffs(self) -> str:
        return str(self.run_dir / "bpf")

    def add_workload(self, name: str, last: int) -> Netns:
        ns = f"{self.ns}{name}"[:15]
        w = Netns(ns, f"10.78.{self.index}.{last}")
        self.fabric._ns.append(ns)
        run("ip", "netns", "add", ns)
        run("ip", "-n", self.ns, "link", "add", f"{name}-h", "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        run("ip", "-n", self.ns, "link", "set", f"{name}-h", "master", "wbr0", "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "addr", "add", f"{w.ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", f"10.78.{self.index}.1")
        if self.fabric.ipv6:
            w.ip6 = f"fd00:78:{self.index}::{last}"
            run("ip", "-n", ns, "addr", "add", f"{w.ip6}/64", "dev", "eth0", "nodad")
            run("ip", "-n", ns, "-6", "route", "add", "default", "via", f"fd00:78:{self.index}::1")
        self.workloads[name] = w
        return w


class Fabric:
    def __init__(self, tag: str = "fl", ipv6: bool = False):
        self.tag = f"{tag}{os.getpid() % 100000}"
        self.ipv6 = ipv6
        self.bridge = f"{self.tag}br"
        self.hosts: dict[str, Host] = {}
        self._ns: list[str] = []
        self._links: list[str] = []
        self._mounts: list[Path] = []

    def __enter__(self) -> "Fabric":
        try:
            run("ip", "link", "add", self.bridge, "address", bridge_mac(self.bridge),
                "type", "bridge", "stp_state", "0")
            self._links.append(self.bridge)
            Path(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6").write_text("1")
            run("ip", "link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def add_address(self, addr: str) -> None:
        run("ip", "addr", "add", f"{addr}/24", "dev", self.bridge)

    def add_host(self, name: str, index: int) -> Host:
        ns = f"{self.tag}{name}"
        run_dir = Path(f"/run/{ns}")
        h = Host(ns, f"10.199.0.{20 + index}", name=name, index=index, fabric=self, run_dir=run_dir)
        self._ns.append(ns)
        run("ip", "netns", "add", ns)
        (run_dir / "bpf").mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "bpf", "bpf", str(run_dir / "bpf"))
        self._mounts.append(run_dir)
        veth = f"{ns}f"
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "fab0", "netns", ns)
        self._links.append(veth)
        Path(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").write_text("1")
        run("ip", "link", "set", veth, "master", self.bridge, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "addr", "add", f"{h.ip}/24", "dev", "fab0")
        run("ip", "-n", ns, "link", "set", "fab0", "up")
        run("ip", "-n", ns, "link", "add", "wbr0", "address", bridge_mac(f"{ns}wbr0"),
            "type", "bridge", "stp_state", "0")
        run("ip", "-n", ns, "addr", "add", f"10.78.{index}.1/24", "dev", "wbr0")
        run("ip", "-n", ns, "link", "set", "wbr0", "up")
        run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        if self.ipv6:
            # the fabric's bridge and host-side veths carry IPv6 frames as they are
            # (only these hosts' own ends have addresses)
            h.ip6 = f"fd00:199::{20 + index}"
            run("ip", "-n", ns, "addr", "add", f"{h.ip6}/64", "dev", "fab0", "nodad")
            run("ip", "-n", ns, "addr", "add", f"fd00:78:{index}::1/64", "dev", "wbr0", "nodad")
            run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.hosts[name] = h
        return h

    def route_all(self) -> None:
        for h in self.hosts.values():
            for p in self.hosts.values():
                if p is not h:
                    run("ip", "-n", h.ns, "route", "replace", p.subnet, "via", p.ip)
                    if self.ipv6:
                        run("ip", "-n", h.ns, "-6", "route", "replace", p.subnet6, "via", p.ip6)

    def close(self) -> None:
        for ns in reversed(self._ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in reversed(self._links):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for d in self._mounts:
            subprocess.run(["umount", str(d / "bpf")], capture_output=True)
            subprocess.run(["rm", "-rf", str(d)], capture_output=True)

    def __exit__(self, *exc) -> None:
        self.close()
