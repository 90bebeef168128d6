"""Datapath comparison: no filter, Stockade, iptables and nftables, measured interleaved.

    .venv/bin/python -m bench.datapath_bench            # N = 10, 1,000, 10,000; 3 rounds
    .venv/bin/python -m bench.datapath_bench --quick    # N = 1,000; 1 round (make bench-quick)

Topology (tests/netns.Topology): a bridge in the root namespace and three namespaces:
server (iperf3 -s and ``netbench server``), client (allowed by the rule set, in the
middle of it: the iptables chain is walked half way for its SYNs) and denied (in no
rule). Filters act on traffic addressed to the server only:

* Stockade: the server is a static endpoint; its host-side veth carries the agent's
  tc programs, whose egress hook enforces the server's ingress policy. Peers are remote
  ipcache entries (/32, one identity each). The client is one of them.
* iptables / nftables: INPUT hook of the server namespace (the same packets: those
  delivered to the server). The root namespace's tables are never touched.

For each N, every round applies A (no filter), B (Stockade), C (iptables), D (nftables)
in turn; each configuration is checked (the client passes, the denied source does not;
with no filter both pass), measured, then removed and checked removed (no tc filter on
the server's veth, an empty ruleset in the server namespace). Ratios are to the no
filter run of the same round; the reported ratio is the median over rounds.

Prints one JSON line (the last line); with --quick it then prints the summary line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import (build_netbench, iptables_rules, median, netfilter_empty, nft_rules,
                          nsrun, pinned_map_count, policy_pin, remove_netfilter, rmtree, stockade_policies,
                          tc_filters, tmpdir)

from agentproc import AgentProcess  # noqa: E402  (tests/ is on sys.path via bench.common)
from netns import Topology  # noqa: E402

CONFIGS = ("nofilter", "stockade", "iptables", "nftables")
IPERF_PORT, RR_PORT, BASE_PORT = 5201, 7000, 10000
MAX_IDS = 10000      # N = 100,000: 10,000 peer identities x 10 ports (issue 19)
SERVER_APP = "bench-server"
SUBNET = "10.213.90"


def peer_ip(i: int) -> str:
    """Addresses of peers that never send (only their rules exist); not routed anywhere."""
    return f"10.214.{i // 250}.{i % 250 + 1}"


class Bench:
    def __init__(self, ns_list, rounds, secs):
        self.ns_list, self.rounds, self.secs = ns_list, rounds, secs
        self.procs: list[subprocess.Popen] = []

    # -------------------------------------------------------------- rule sets
    def layout(self, n: int):
        """[(label, ip, ports)] in rule order: N (identity, port) pairs over
        min(N, 1000) identities, the client's identity in the middle; the client
        also gets the benchmark ports (one extra entry when each peer has one port)."""
        k = min(n, MAX_IDS)
        per = max(1, n // k)
        peers = [(f"p{i}", peer_ip(i), [BASE_PORT + j for j in range(per)]) for i in range(k - 1)]
        client_ports = [IPERF_PORT, RR_PORT] + [BASE_PORT + j for j in range(max(0, per - 2))]
        peers.insert(len(peers) // 2, ("client", self.cli.ip4, client_ports))
        return peers

    # -------------------------------------------------------------- configs
    def apply(self, cfg: str, n: int) -> None:
        if cfg == "stockade":
            self.agent.client.add_endpoint(name="bench-server", interface=self.srv.host_if,
                                           ips=[self.srv.ip4], labels={"app": SERVER_APP})
        elif cfg == "iptables":
            nsrun(self.srv.ns, "iptables-restore", input=iptables_rules(self.pairs))
        elif cfg == "nftables":
            nsrun(self.srv.ns, "nft", "-f", "-", input=nft_rules(self.pairs))

    def remove(self, cfg: str) -> None:
        if cfg == "stockade":
            if any(e["name"] == "bench-server" for e in self.agent.client.endpoints()):
                self.agent.client.remove_endpoint("bench-server")
        elif cfg in ("iptables", "nftables"):
            remove_netfilter(self.srv.ns)

    def check_removed(self) -> None:
        if tc_filters(self.srv.host_if) or not netfilter_empty(self.srv.ns):
            raise RuntimeError(f"filters left on the server path: {tc_filters(self.srv.host_if)!r} "
                               f"{nsrun(self.srv.ns, 'nft', 'list', 'ruleset').stdout!r}")

    def reaches(self, ns: str) -> bool:
        return nsrun(ns, self.nb, "probe", self.srv.ip4, str(RR_PORT), "0.5",
                     check=False).returncode == 0

    def sanity(self, cfg: str) -> None:
        ok, denied_ok = self.reaches(self.cli.ns), self.reaches(self.bad.ns)
        if not ok or denied_ok != (cfg == "nofilter"):
            raise RuntimeError(f"{cfg}: allowed client reaches={ok}, denied source reaches={denied_ok}")

    # -------------------------------------------------------------- metrics
    def measure(self) -> dict:
        ip = self.srv.ip4
        r = nsrun(self.cli.ns, "iperf3", "-c", ip, "-p", str(IPERF_PORT), "-t", str(self.secs + 1),
                  "-O", "1", "-J")
        tput = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
        rr = json.loads(nsrun(self.cli.ns, self.nb, "rr", ip, str(RR_PORT), str(self.secs)).stdout)
        crr = json.loads(nsrun(self.cli.ns, self.nb, "crr", ip, str(RR_PORT), str(self.secs),
                               "4").stdout)
        return {"throughput_gbps": round(tput, 3), "rr_per_s": rr["rate"], "conn_per_s": crr["rate"],
                "conn_p50_us": crr["p50_us"], "conn_p99_us": crr["p99_us"],
                "conn_errors": crr["errors"]}

    # -------------------------------------------------------------- run
    def run(self) -> dict:
        tmp = tmpdir("stockade-bench-dp-")
        try:
            self.nb = build_netbench(tmp)
            with Topology(tag="d") as topo:
                self.srv = topo.add_workload("s", [f"{SUBNET}.1/24"])
                self.cli = topo.add_workload("c", [f"{SUBNET}.2/24"])
                self.bad = topo.add_workload("x", [f"{SUBNET}.3/24"])
                for w in (self.cli, self.bad):
                    nsrun(w.ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                          "net.ipv4.ip_local_port_range=1024 65000")
                try:
                    self.procs.append(subprocess.Popen(
                        ["ip", "netns", "exec", self.srv.ns, "iperf3", "-s", "-p", str(IPERF_PORT)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    self.procs.append(subprocess.Popen(
                        ["ip", "netns", "exec", self.srv.ns, self.nb, "server", str(RR_PORT)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
                    with AgentProcess(managed_bridges=[], managed_interfaces=[]) as agent:
                        self.agent = agent
                        return self.run_with_agent()
                finally:
                    self.stop_servers()
        finally:
            rmtree(tmp)

    def stop_servers(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                # netbench forks one loop per CPU in its own session: signal the group
                # it leads (its own PID), iperf3 directly.
                try:
                    os.killpg(p.pid, 15) if p.args[4:5] == [self.nb] else p.terminate()
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.procs.clear()

    def run_with_agent(self) -> dict:
        time.sleep(0.3)
        peers = self.layout(max(self.ns_list))
        entries = [{"prefix": f"{ip}/32", "labels": {"bench-peer": label}, "host": "bench-peer-host"}
                   for label, ip, _ in peers]
        for i in range(0, len(entries), 5000):     # one transaction per 5,000 (PATCH /v1/ipcache)
            self.agent.client.add_ipcache_entries(entries[i:i + 5000])
        out = {"rounds": self.rounds, "seconds_per_metric": self.secs, "n": {}}
        for n in self.ns_list:
            layout = self.layout(n)
            self.pairs = [(ip, port) for _, ip, ports in layout for port in ports]
            self.agent.client.put_policies(
                [{"name": f"bench-{n}.yaml",
                  "text": stockade_policies([(lab, ports) for lab, _, ports in layout], SERVER_APP)}],
                replace_all=True)
            raw = {c: [] for c in CONFIGS}
            entries = None
            for _ in range(self.rounds):
                for cfg in CONFIGS:
                    self.check_removed()
                    try:
                        self.apply(cfg, n)
                        self.sanity(cfg)
                        if cfg == "stockade":
                            entries = pinned_map_count(policy_pin(self.agent.settings['bpffs_dir']))
                        raw[cfg].append(self.measure())
                    finally:
                        self.remove(cfg)
                    self.check_removed()
            out["n"][str(n)] = summarize(raw, n, len(layout), len(self.pairs), entries)
            print(f"datapath N={n}: {json.dumps(out['n'][str(n)]['ratios'])}", file=sys.stderr,
                  flush=True)
        out["targets"] = targets(out["n"])
        return out


def summarize(raw: dict, n: int, ids: int, pairs: int, entries) -> dict:
    metrics = list(raw["nofilter"][0])
    res = {"identities": ids, "allowed_pairs": pairs, "stockade_policy_map_entries": entries,
           "median": {c: {m: round(median([r[m] for r in raw[c]]), 3) for m in metrics}
                      for c in CONFIGS},
           "ratios": {}, "raw": raw}
    for c in CONFIGS[1:]:
        res["ratios"][c] = {}
        for m in ("throughput_gbps", "rr_per_s", "conn_per_s"):
            vals = [r[m] / base[m] for r, base in zip(raw[c], raw["nofilter"]) if base[m]]
            res["ratios"][c][m] = round(median(vals), 3)
    return res


def targets(by_n: dict) -> dict:
    """The figures issue 5 sets targets on, at the largest and smallest N measured."""
    lo, hi = by_n[min(by_n, key=int)], by_n[max(by_n, key=int)]
    st_hi, st_lo = hi["ratios"]["stockade"], lo["ratios"]["stockade"]
    raw = hi["raw"]
    vs_nft = [s["conn_per_s"] / f["conn_per_s"] for s, f in zip(raw["stockade"], raw["nftables"])]
    return {
        "n_max": int(max(by_n, key=int)), "n_min": int(min(by_n, key=int)),
        "throughput_ratio": st_hi["throughput_gbps"],
        "conn_rate_ratio": st_hi["conn_per_s"],
        "rr_ratio": st_hi["rr_per_s"],
        # flat from N = 10 to 10,000: relative change of the ratio (target: within 5 %)
        "throughput_ratio_change": round(st_hi["throughput_gbps"] / st_lo["throughput_gbps"] - 1, 3),
        "conn_rate_ratio_change": round(st_hi["conn_per_s"] / st_lo["conn_per_s"] - 1, 3),
        "conn_rate_vs_nftables": round(median(vs_nft), 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 100,000, 3 rounds, 2 s per metric")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        res = Bench([100000], rounds=args.rounds or 3, secs=2).run()
    else:
        res = Bench([10, 100000], rounds=args.rounds or 5, secs=2).run()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
