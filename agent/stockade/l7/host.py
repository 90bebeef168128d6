"""The host's side of L7 steering: what takes a steered packet to the proxy.

  * a policy route: packets with the L7 mark go to a table whose only route is
    ``local default dev lo`` (IPv4 and IPv6), so they are delivered on this host;
  * an nft table (family inet): in prerouting, TPROXY hands marked packets to the
    proxy's listener or to the proxy's own socket of that connection; whatever no
    socket takes is dropped (the proxy down closes the port). A connection routed to
    an L7 port of a local endpoint from another host is not taken here: its SYN goes
    on to the server's tc hook, whose ingress policy decides first, and which steers it
    back marked (bpf/lib/l7.h). Its later packets are, by the proxy's transparent
    socket (``socket transparent``): forwarded, they would meet that socket in early
    demux, and the kernel never forwards a packet that has a local socket. Replies to
    a local client with egress HTTP rules from its L7 port (from another host) that
    belong to a proxy's socket get the mark, so they are delivered to it, not routed on
    to the client. In output, connections the host itself opens to an L7 port, and its
    replies to such a client, get the mark (and so loop through lo into prerouting),
    except the proxy's own (its user id).
"""
from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MARK_MASK = 0xFFFF0000


class HostError(Exception):
    pass


def _run(argv: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise HostError(f"{' '.join(argv[:4])}: {r.stderr.strip()[:500]}")
    return r


@dataclass(frozen=True)
class HostSteering:
    table: str          # nft table name (family inet)
    mark: int
    route_table: int
    rule_priority: int
    proxy_port: int
    proxy_uid: int

    def ruleset(self) -> str:
        m, mask, port = f"0x{self.mark:08x}", f"0x{MARK_MASK:08x}", self.proxy_port
        return f"""table inet {self.table} {{
  set targets4 {{ type ipv4_addr . inet_service; }}
  set targets6 {{ type ipv6_addr . inet_service; }}
  set clients4 {{ type ipv4_addr . inet_service; }}
  set clients6 {{ type ipv6_addr . inet_service; }}
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp meta mark & {mask} == {m} tproxy ip to :{port} accept
    meta l4proto tcp meta mark & {mask} == {m} tproxy ip6 to :{port} accept
    ip daddr . tcp dport @targets4 socket transparent 1 meta mark set {m} tproxy ip to :{port} accept
    ip6 daddr . tcp dport @targets6 socket transparent 1 meta mark set {m} tproxy ip6 to :{port} accept
    ip daddr . tcp sport @clients4 socket transparent 1 meta mark set {m} accept
    ip6 daddr . tcp sport @clients6 socket transparent 1 meta mark set {m} accept
    meta mark & {mask} == {m} drop
  }}
  chain output {{
    type route hook output priority mangle; policy accept;
    meta skuid {self.proxy_uid} return
    ip daddr . tcp dport @targets4 meta mark set {m}
    ip6 daddr . tcp dport @targets6 meta mark set {m}
    ip daddr . tcp sport @clients4 meta mark set {m}
    ip6 daddr . tcp sport @clients6 meta mark set {m}
  }}
}}
"""

    def install(self) -> None:
        """Create (or re-create) the table and the policy routes; idempotent."""
        self.remove_table()
        _run(["nft", "-f", "-"], self.ruleset())
        m = f"0x{self.mark:x}/0x{MARK_MASK:x}"
        for fam, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
            _run(["ip", fam, "rule", "del", "pref", str(self.rule_priority)], check=False)
            _run(["ip", fam, "rule", "add", "pref", str(self.rule_priority), "fwmark", m,
                  "lookup", str(self.route_table)])
            _run(["ip", fam, "route", "replace", "local", default, "dev", "lo",
                  "table", str(self.route_table)])

    def set_targets(self, targets: Iterable[tuple[str, int]],
                    clients: Iterable[tuple[str, int]] = ()) -> None:
        """``targets``: (server address, L7 port) of ingress rules; ``clients``: (client
        address, port) of egress rules, whose replies from other hosts (or this one's
        own sockets) go back to the proxy's socket of that connection."""
        cmds = []
        for name, items in (("targets", targets), ("clients", clients)):
            items = list(items)
            v4 = sorted(f"{a} . {p}" for a, p in items if ":" not in a)
            v6 = sorted(f"{a} . {p}" for a, p in items if ":" in a)
            cmds += [f"flush set inet {self.table} {name}4", f"flush set inet {self.table} {name}6"]
            if v4:
                cmds.append(f"add element inet {self.table} {name}4 {{ {', '.join(v4)} }}")
            if v6:
                cmds.append(f"add element inet {self.table} {name}6 {{ {', '.join(v6)} }}")
        _run(["nft", "-f", "-"], "\n".join(cmds) + "\n")

    def remove_table(self) -> None:
        _run(["nft", "delete", "table", "inet", self.table], check=False)

    def remove(self) -> None:
        self.remove_table()
        for fam in ("-4", "-6"):
            _run(["ip", fam, "rule", "del", "pref", str(self.rule_priority)], check=False)
            _run(["ip", fam, "route", "flush", "table", str(self.route_table)], check=False)


def loosen_rp_filter(devices: Iterable[str], conf: str = "/proc/sys/net/ipv4/conf") -> list[str]:
    """Strict reverse-path filtering drops what the steering delivers into a bridge with a
    remote client's source address (routed from another host, its route is elsewhere).
    The kernel applies the larger of conf/all and conf/<device>: 2 (loose) on the device
    keeps the check for spoofed sources unknown to every route. Only devices that are
    strict change; -> their names."""
    changed: list[str] = []
    try:
        every = int(Path(conf, "all", "rp_filter").read_text())
    except (OSError, ValueError):
        return changed
    for dev in devices:
        path = Path(conf, dev, "rp_filter")
        try:
            if max(every, int(path.read_text())) == 1:
                path.write_text("2")
                changed.append(dev)
        except (OSError, ValueError):
            continue    # gone meanwhile: the next commit sees the current devices
    return changed


def remove_host_steering(cfg) -> None:
    """What ``HostSteering.install`` made for the agent of ``cfg`` (``--cleanup``)."""
    HostSteering(cfg.l7_nft_table, cfg.l7_mark, cfg.l7_route_table, cfg.l7_rule_priority,
                 cfg.l7_proxy_port, 0).remove()


def ipv6_disabled(devices: Iterable[str], conf: str = "/proc/sys/net/ipv6/conf") -> list[str]:
    """Which of ``devices`` have their own IPv6 off (``disable_ipv6`` 1, or no IPv6 in
    the kernel at all: no ``conf``): their stack drops every IPv6 packet, so IPv6
    connections steered into it never reach the proxy. A device that is gone meanwhile
    is left out (the next commit sees the current devices). Only reads."""
    devices = list(devices)
    if not Path(conf).is_dir():
        return sorted(devices)
    off: list[str] = []
    for dev in devices:
        try:
            if int(Path(conf, dev, "disable_ipv6").read_text()) != 0:
                off.append(dev)
        except (OSError, ValueError):
            continue
    return sorted(off)
