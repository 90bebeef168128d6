"""The BPF programs' own cost per packet (kernel.bpf_stats_enabled), at N = 10 and
100,000, for this build and for the baseline build before the datapath changes of
issues 14 and 19 (tests/oldbuild.py: from git history), measured interleaved.

    .venv/bin/python -m bench.bpf_cost_bench             # both builds, 3 rounds
    .venv/bin/python -m bench.bpf_cost_bench --quick     # both builds, 1 round
    .venv/bin/python -m bench.bpf_cost_bench --child [--pythonpath DIR]   # one build, one round

Topology (tests/netns.Topology): a server and a client namespace on one bridge. The
datapath is loaded directly (stockade.datapath.Datapath, own pins) and attached to the
host side of the server's veth only; the client is a remote ipcache entry. N policy
entries (N allowed (peer identity, TCP port) pairs over min(N, 1,000) peer identities,
the client's among them, default deny) are written with ``apply_delta``: the map
contents the compiler would produce, without an agent (its compile time at N = 100,000
is not what this measures).

For each N and round: ``netbench rr`` (one persistent connection, 1-byte request and
reply: the established-flow path) and ``netbench crr`` (new connections, 4 clients:
policy lookups, conntrack creates, flow events), each 3 s, with bpf_stats switched on
for that run only (the previous setting is restored). Reported: run count and ns per
run of each program (from_endpoint: packets the server sends; to_endpoint: packets
delivered to it), median over rounds, plus the packet rates. Then, without traffic
noise, BPF_PROG_TEST_RUN of four fixed frames 200,000 times each (test_run_costs).

Each build runs in its own process (``--child``; ``--pythonpath DIR`` puts DIR/agent
first, which is how the baseline runs), one round at a time, the two builds taking
turns. The child only uses Datapath, attach/detach and apply_delta, which every build
has. Reported per N, mode and build: the median over rounds.

Prints one JSON line (the last line).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, build_netbench, median, nsrun, rmtree, tmpdir

RR_PORT = 7000
SUBNET = "10.213.91"
SERVER_ID, PEER_BASE = 5001, 20000
MAX_IDS = 1000
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def peer_ip(i: int) -> str:
    return f"10.215.{i // 250}.{i % 250 + 1}"


def prog_stats(fd: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of the program behind our own fd ``fd``."""
    info = dict(line.split(":\t", 1) for line in
                Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines() if ":\t" in line)
    return int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0))


def policy_for(n: int, client_ip: str):
    """(ipcache {prefix: identity}, entries, flags) for N allowed pairs."""
    from stockade.policy.mapstate import INGRESS, PROTO_TCP, DirectionPolicy, Entry, Key
    k = min(n, MAX_IDS)
    per = max(1, n // k)
    ipc, entries = {}, {}
    for i in range(k):
        ident = PEER_BASE + i
        ip = client_ip if i == k // 2 else peer_ip(i)
        ipc[f"{ip}/32"] = ident
        ports = [10000 + j for j in range(per)]
        if i == k // 2:
            ports[0] = RR_PORT
        for p in ports:
            entries[Key(SERVER_ID, ident, INGRESS, PROTO_TCP, p, 16)] = Entry(deny=False)
    return ipc, entries, {(SERVER_ID, INGRESS): DirectionPolicy(enforced=True, default_deny=True)}


TEST_RUN_REPEAT = 200_000


def _test_run_module():
    """stockade.datapath.testrun of this checkout, also when the datapath package is
    another build's (it only needs that package's DatapathError)."""
    import importlib.util
    path = ROOT / "agent" / "stockade" / "datapath" / "testrun.py"
    spec = importlib.util.spec_from_file_location("stockade.datapath.testrun", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_costs(dp, srv, cli) -> dict:
    """ns per run of fixed frames at the server's interface (BPF_PROG_TEST_RUN, the
    same frame TEST_RUN_REPEAT times: warm caches, no traffic noise):
    an established TCP segment to the server and its reply from the server, a denied
    SYN (both policy lookups every time), and a neighbour solicitation from the server."""
    import packets as P
    tr = _test_run_module()
    to_ep, from_ep = tr.ProgTestRun(dp.to_endpoint_fd), tr.ProgTestRun(dp.from_endpoint_fd)
    c, s = cli, srv
    seg = P.eth(s.mac, c.mac, P.ETH_IP, P.ipv4(c.ip4, s.ip4, P.TCP, P.tcp(40000, RR_PORT, 0x02)))
    ack = P.eth(s.mac, c.mac, P.ETH_IP, P.ipv4(c.ip4, s.ip4, P.TCP, P.tcp(40000, RR_PORT, 0x10)))
    reply = P.eth(c.mac, s.mac, P.ETH_IP, P.ipv4(s.ip4, c.ip4, P.TCP, P.tcp(RR_PORT, 40000, 0x10)))
    denied = P.eth(s.mac, c.mac, P.ETH_IP, P.ipv4(c.ip4, s.ip4, P.TCP, P.tcp(40001, 9, 0x02)))
    from ipaddress import IPv6Address
    m = P.mac_bytes(s.mac)
    ll = str(IPv6Address(b"\xfe\x80" + b"\0" * 6 + bytes([m[0] ^ 2]) + m[1:3] + b"\xff\xfe" + m[3:]))
    target = "fe80::1"
    ns = P.ns_frame(s.mac, P.multicast_mac(P.solicited_node(target)), ll,
                    P.solicited_node(target), target)
    idx = s.host_ifindex
    to_ep(seg, idx)                      # opens the flow (the SYN is allowed)
    out = {}
    for name, run, frame in (("established_to_endpoint", to_ep, ack),
                             ("reply_from_endpoint", from_ep, reply),
                             ("denied_syn_to_endpoint", to_ep, denied),
                             ("neighbour_solicitation_from_endpoint", from_ep, ns)):
        out[name] = run(frame, idx, repeat=TEST_RUN_REPEAT)[1]
    return out


class CostBench:
    def __init__(self, ns_list, rounds, secs):
        self.ns_list, self.rounds, self.secs = ns_list, rounds, secs

    def run(self) -> dict:
        from netns import Topology
        from stockade.datapath import Datapath, attach, detach
        tmp = tmpdir("stockade-bench-cost-")
        settings = {"STOCKADE_PIN_DIR": f"/sys/fs/bpf/stockade-bench-cost-{os.getpid()}",
                    "POLICY_MAX": max(self.ns_list) + 1024, "IPCACHE_MAX": 4096,
                    "CT_MAX": 262144}      # the agent's default ct_map_size
        server = None
        dp = None
        out = {"rounds": self.rounds, "seconds_per_run": self.secs, "n": {}}
        try:
            nb = build_netbench(tmp)
            with Topology(tag="k") as topo:
                srv = topo.add_workload("s", [f"{SUBNET}.1/24"])
                cli = topo.add_workload("c", [f"{SUBNET}.2/24"])
                nsrun(cli.ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                      "net.ipv4.ip_local_port_range=1024 65000")
                server = subprocess.Popen(["ip", "netns", "exec", srv.ns, nb, "server",
                                           str(RR_PORT)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
                dp = Datapath(settings)
                dp.flush()
                dp.set_endpoint(srv.host_ifindex, 1, SERVER_ID, [srv.ip4], mac=srv.mac)
                attach(srv.host_ifindex, dp.from_endpoint_fd, dp.to_endpoint_fd)
                try:
                    for n in self.ns_list:
                        out["n"][str(n)] = self.one_n(dp, nb, srv, cli, n)
                        print(f"bpf cost N={n}: {json.dumps(out['n'][str(n)]['median'])}",
                              file=sys.stderr, flush=True)
                finally:
                    detach(srv.host_ifindex)
        finally:
            if server is not None:
                try:
                    os.killpg(server.pid, 15)
                except ProcessLookupError:
                    pass
                server.wait(timeout=5)
            if dp is not None:
                dp.remove_pins()
                dp.close()
            rmtree(tmp)
        return out

    def one_n(self, dp, nb, srv, cli, n) -> dict:
        from stockade.policy.mapstate import diff
        ipc, entries, flags = policy_for(n, cli.ip4)
        for prefix in list(dp.ipcache_entries()):
            dp.del_ipcache(prefix)
        for prefix, ident in ipc.items():
            dp.set_ipcache(prefix, ident)
        dp.set_ipcache(f"{srv.ip4}/32", SERVER_ID)
        t = time.perf_counter()
        dp.apply_delta(diff(dp.policy_entries(), entries, dp.policy_flags(), flags))
        write_s = time.perf_counter() - t
        raw = {"rr": [], "crr": []}
        for _ in range(self.rounds):
            for mode in ("rr", "crr"):
                raw[mode].append(self.measure(dp, nb, srv, cli, mode))
        med = {mode: {k: round(median([r[k] for r in runs]), 1) for k in runs[0]}
               for mode, runs in raw.items()}
        return {"policy_entries": len(entries), "write_s": round(write_s, 2),
                "median": med, "raw": raw, "test_run_ns": test_run_costs(dp, srv, cli)}

    def measure(self, dp, nb, srv, cli, mode) -> dict:
        fds = {"from_endpoint": dp.from_endpoint_fd, "to_endpoint": dp.to_endpoint_fd}
        # as the agent's gc would have by now: closed connections of earlier runs gone
        dp.ct_gc(now_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 11 * 10**9)
        before_setting = STATS.read_text().strip()
        STATS.write_text("1")
        try:
            before = {k: prog_stats(fd) for k, fd in fds.items()}
            argv = [nb, "rr", srv.ip4, str(RR_PORT), str(self.secs)] if mode == "rr" else \
                [nb, "crr", srv.ip4, str(RR_PORT), str(self.secs), "4"]
            rate = json.loads(nsrun(cli.ns, *argv).stdout)["rate"]
            after = {k: prog_stats(fd) for k, fd in fds.items()}
        finally:
            STATS.write_text(before_setting)
        res = {"rate_per_s": rate}
        for k in fds:
            cnt = after[k][0] - before[k][0]
            ns = after[k][1] - before[k][1]
            res[f"{k}_runs"] = cnt
            res[f"{k}_ns"] = round(ns / cnt, 1) if cnt else 0.0
        return res


NS = [10, 100000]


def child(pythonpath: str | None) -> dict:
    if pythonpath:
        sys.path.insert(0, str(Path(pythonpath) / "agent"))
    import stockade.datapath as sd
    res = CostBench(NS, rounds=1, secs=3).run()
    res["datapath_source"] = str(Path(sd.__file__).resolve().parents[2])
    return res


def interleaved(rounds: int) -> dict:
    from oldbuild import UPGRADE_FROM, old_build
    runs = {"before": [], "after": []}
    with old_build() as tree:
        for _ in range(rounds):
            for build, extra in (("before", ["--pythonpath", str(tree)]), ("after", [])):
                out = subprocess.run([sys.executable, "-m", "bench.bpf_cost_bench", "--child",
                                      *extra], capture_output=True, text=True, check=True,
                                     timeout=900, cwd=ROOT)
                runs[build].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = {"rounds": rounds, "baseline_commit": UPGRADE_FROM, "n": {}}
    for n in map(str, NS):
        res["n"][n] = {}
        for build, rs in runs.items():
            meds = {}
            for mode in ("rr", "crr"):
                vals = [r["n"][n]["median"][mode] for r in rs]
                meds[mode] = {k: round(median([v[k] for v in vals]), 1) for k in vals[0]}
            tr = [r["n"][n]["test_run_ns"] for r in rs]
            meds["test_run_ns"] = {k: median([t[k] for t in tr]) for k in tr[0]}
            res["n"][n][build] = meds
        for mode in ("rr", "crr"):
            for prog in ("from_endpoint", "to_endpoint"):
                b = res["n"][n]["before"][mode][f"{prog}_ns"]
                a = res["n"][n]["after"][mode][f"{prog}_ns"]
                res["n"][n].setdefault("after_over_before", {})[f"{mode}_{prog}"] = \
                    round(a / b, 3) if b else None
        for k, b in res["n"][n]["before"]["test_run_ns"].items():
            a = res["n"][n]["after"]["test_run_ns"][k]
            res["n"][n]["after_over_before"][f"test_run_{k}"] = round(a / b, 3) if b else None
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round per build")
    ap.add_argument("--child", action="store_true", help="measure one build, one round")
    ap.add_argument("--pythonpath", help="(--child) another checkout: its agent/ comes first")
    args = ap.parse_args(argv)
    res = child(args.pythonpath) if args.child else interleaved(1 if args.quick else 3)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
