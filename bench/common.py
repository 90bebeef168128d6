"""Shared pieces of the root benchmarks: the netbench binary, the rule sets of the
four datapath configurations, and cleanup that removes only what a benchmark made.

The workloads come from the test helpers (tests/netns.py, tests/agentproc.py,
tests/podman.py): the benchmarks measure the same real agent the tests check.

Rule sets (``pairs`` is a list of allowed (source IPv4, TCP port); the server
namespace is the enforcement point for iptables and nftables, the host side of the
server's veth for Stockade -- both see exactly the packets addressed to the server):

* iptables: INPUT of the server namespace, conntrack ESTABLISHED,RELATED accept
  first, loopback accept, one ``-s IP -p tcp --dport P -j ACCEPT`` per pair, DROP.
* nftables: one ``ip`` table with an ``ipv4_addr . inet_service`` set and
  ``ct state established,related accept; ip saddr . tcp dport @allowed accept``,
  policy drop.
* Stockade: one CiliumNetworkPolicy per peer identity selecting the server and
  allowing its ports; peers are remote ipcache entries (one /32 each).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

NFT_TABLE = "stockbench"


def enter_own_namespace() -> None:
    """Run the rest of this benchmark process in a network namespace of its own (as
    ``make bench`` runs each one, bench/run.py), so its agents never meet a demo
    agent's (one agent per namespace, issue 14.4). No-op unprivileged or already in
    one."""
    from netns import OUTER_ENV, OwnNamespace
    if os.geteuid() == 0 and OUTER_ENV not in os.environ:
        OwnNamespace().enter()   # held for the process's life


def build_netbench(out_dir: str) -> str:
    """gcc -O2 -static bench/netbench.c (static: it also runs inside busybox containers)."""
    out = os.path.join(out_dir, "netbench")
    subprocess.run(["gcc", "-O2", "-static", "-o", out, str(ROOT / "bench" / "netbench.c")],
                   check=True, capture_output=True, text=True)
    return out


def tmpdir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/run")


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def nsrun(ns: str, *argv: str, input: str | None = None, check: bool = True,
          timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", "netns", "exec", ns, *argv], input=input, capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"in {ns}: {' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def pct(values, p: float) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    k = min(len(vals) - 1, max(0, int(round(p / 100 * (len(vals) - 1)))))
    return vals[k]


def median(values):
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- rule sets
def iptables_rules(pairs) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
             "-A INPUT -i lo -j ACCEPT"]
    lines += [f"-A INPUT -s {ip}/32 -p tcp -m tcp --dport {port} -j ACCEPT" for ip, port in pairs]
    lines += ["-A INPUT -j DROP", "COMMIT", ""]
    return "\n".join(lines)


def nft_rules(pairs) -> str:
    elems = ",\n    ".join(f"{ip} . {port}" for ip, port in pairs)
    return f"""table ip {NFT_TABLE} {{
  set allowed {{
    type ipv4_addr . inet_service
    elements = {{
    {elems}
    }}
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iif "lo" accept
    ip saddr . tcp dport @allowed accept
  }}
}}
"""


def stockade_policies(peers: list[tuple[str, list[int]]], server_app: str) -> str:
    """One CNP per peer label; ``peers`` = [(peer label value, ports)]."""
    docs = []
    for label, ports in peers:
        plist = ", ".join(f'{{port: "{p}", protocol: TCP}}' for p in ports)
        docs.append(f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: allow-{label}}}
spec:
  endpointSelector: {{matchLabels: {{app: {server_app}}}}}
  ingress: [{{fromEndpoints: [{{matchLabels: {{bench-peer: {label}}}}}], toPorts: [{{ports: [{plist}]}}]}}]
""")
    return "---\n".join(docs)


def stockade_policies_json(peers: list[tuple[str, list[int]]], server_app: str) -> str:
    """The documents of ``stockade_policies`` as one JSON list (a ``.json`` file)."""
    import yaml
    return json.dumps(list(yaml.safe_load_all(stockade_policies(peers, server_app))))


def remove_netfilter(ns: str) -> None:
    """Delete the tables this benchmark created in its own namespace ``ns`` (the
    iptables-nft ``ip filter`` table and our nft table); never the host's."""
    assert ns.startswith("sk"), ns  # only namespaces made by tests/netns.Topology
    nsrun(ns, "nft", "delete", "table", "ip", "filter", check=False)
    nsrun(ns, "nft", "delete", "table", "ip", NFT_TABLE, check=False)


def netfilter_empty(ns: str) -> bool:
    return nsrun(ns, "nft", "list", "ruleset").stdout.strip() == ""


def tc_filters(ifname: str) -> str:
    """The programs left on ``ifname``, tc filters and tcx links ('' when none)."""
    from attached import program_ids  # tests/attached.py
    out = ""
    for d in ("ingress", "egress"):
        out += subprocess.run(["tc", "filter", "show", "dev", ifname, d], capture_output=True,
                              text=True).stdout
    ids = program_ids(ifname)
    return (out.strip() + (f" programs {ids}" if ids else "")).strip()


def rss_mb(pid: int) -> dict:
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = round(int(v.split()[0]) / 1024, 1)
    return vals


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM ``proc`` (a process the bench started), then SIGKILL after ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return time.perf_counter() - t, r


def policy_pin(bpffs_dir: str) -> str:
    """The pinned policy map of an agent whose pins are in ``bpffs_dir`` (at the current
    layout version's file name)."""
    from stockade.datapath.pins import pin_name
    return f"{bpffs_dir}/{pin_name('policy')}"


def pinned_map_count(path: str) -> int:
    """Entries in a pinned BPF map, read from the kernel (not from the agent's model)."""
    import ctypes as ct
    from bcc.libbcc import lib
    lib.bpf_obj_get.restype = ct.c_int
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    fd = lib.bpf_obj_get(path.encode())
    if fd < 0:
        raise OSError(ct.get_errno(), f"bpf_obj_get {path}")
    try:
        key, nxt = ct.create_string_buffer(256), ct.create_string_buffer(256)
        n, prev = 0, None
        while lib.bpf_get_next_key(fd, prev, nxt) == 0:
            n += 1
            ct.memmove(key, nxt, 256)
            prev = key
        return n
    finally:
        os.close(fd)


def rss_breakdown(pid: int, top: int = 6) -> dict:
    """Resident MB per mapped file (anonymous memory as "[anon]"), largest first:
    shows what a process's RSS is made of (e.g. LLVM inside bcc)."""
    sizes: dict[str, int] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping header line
                path = head[5] if len(head) >= 6 else ""
                name = os.path.basename(path) if path.startswith("/") else (path or "[anon]")
            elif head[0] == "Rss:":
                sizes[name] = sizes.get(name, 0) + int(head[1])
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(v / 1024, 1) for k, v in ranked}
