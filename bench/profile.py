"""Profiles behind the missed targets (docs/performance.md cites them).

    .venv/bin/python -m bench.profile [import] [datapath]

import    py-spy (pinned in the dev extras) samples the agent while it imports 10,000
          policy entries over the API (the same layout as bench.controlplane_bench):
          where the seconds go, by Python function (self and inclusive).
datapath  perf (Debian's linux-perf) samples all CPUs while netbench runs the
          request/response loop through Stockade at N = 10,000, then the same with no
          filter: the kernel and BPF symbols that the filter adds.

Full reports go to bench/results/profile-<date>-<name>.txt; the JSON line carries the
top rows.
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, build_netbench, nsrun, rmtree, stockade_policies, tmpdir
from bench.controlplane_bench import layout
from bench.datapath_bench import RR_PORT, SERVER_APP, SUBNET

from agentproc import AgentProcess  # noqa: E402
from netns import Topology  # noqa: E402

PY_SPY = str(Path(sys.executable).parent / "py-spy")
RESULTS = ROOT / "bench" / "results"


def _out(name: str) -> Path:
    return RESULTS / f"profile-{datetime.date.today().isoformat()}-{name}.txt"


def top_python(collapsed: str, n: int = 12) -> tuple[list, list]:
    """From py-spy's collapsed stacks: top (function, % of samples) self and inclusive."""
    self_c, incl, total = collections.Counter(), collections.Counter(), 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        # "fn (path/file.py:LINE)" -> "fn (path/file.py)": one row per function
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        self_c[frames[-1]] += c
        for f in set(frames):
            if "daemon/server.py" in f:  # the HTTP handler frames wrap everything
                continue
            if "stockade" in f or "bcc" in f or "yaml" in f or "json" in f:
                incl[f] += c
    pct = lambda cnt: [[f, round(100 * v / total, 1)] for f, v in cnt.most_common(n)]  # noqa: E731
    return pct(self_c), pct(incl)


def profile_import() -> dict:
    tmp = tmpdir("stockade-bench-prof-")
    try:
        with Topology(tag="p") as topo:
            srv = topo.add_workload("s", [f"{SUBNET}.1/24"])
            with AgentProcess(managed_bridges=[], managed_interfaces=[]) as agent:
                c = agent.client
                lay = layout(10000)
                for label, ip, _ in lay:
                    c.add_ipcache(f"{ip}/32", {"bench-peer": label}, "bench-peer-host")
                c.add_endpoint(name="bench-server", interface=srv.host_if, ips=[srv.ip4],
                               labels={"app": SERVER_APP})
                text = stockade_policies([(lab, ports) for lab, _, ports in lay], SERVER_APP)
                raw = os.path.join(tmp, "import.collapsed")
                spy = subprocess.Popen([PY_SPY, "record", "-p", str(agent.proc.pid), "-r", "250",
                                        "-f", "raw", "-o", raw, "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                t = time.perf_counter()
                c.put_policies([{"name": "bench.yaml", "text": text}])
                took = time.perf_counter() - t
                time.sleep(0.3)
                spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                spy.wait(timeout=30)
                collapsed = Path(raw).read_text()
        # Idle agent threads (API server waiting, link watcher) are not sampled without -i.
        self_top, incl_top = top_python(collapsed, 15)
        _out("import").write_text(
            f"py-spy of the agent during an API import of 10,000 entries ({took:.2f} s)\n\n"
            "self (% of samples):\n" + "\n".join(f"{p:6.1f}  {f}" for f, p in self_top) +
            "\n\ninclusive, stockade/bcc/yaml/json frames (% of samples):\n" +
            "\n".join(f"{p:6.1f}  {f}" for f, p in incl_top) + "\n")
        return {"import_s": round(took, 2), "import_top_self": self_top[:8],
                "import_top_inclusive": incl_top[:10]}
    finally:
        rmtree(tmp)


def perf_top(data: str, n: int = 15) -> tuple[list, float, str]:
    """Top symbols of the netbench processes only (the packet path runs in their
    context: veth transmit, bridge, receive and the tc programs); the machine may be
    busy with other work, which this leaves out. Also the share of BPF programs."""
    r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--comms",
                        "netbench", "--sort", "sym", "-g", "none", "--percent-limit", "0.3"],
                       capture_output=True, text=True)
    rows, bpf = [], 0.0
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and parts[1] in ("[k]", "[.]"):
            rows.append([" ".join(parts[2:]), float(parts[0].rstrip("%"))])
            if parts[2].startswith("bpf_prog_"):
                bpf += float(parts[0].rstrip("%"))
    return rows[:n], round(bpf, 2), r.stdout


def bpf_prog_stats(pid: int) -> dict:
    """run_cnt and mean run time of the BPF programs process ``pid`` holds (fdinfo;
    needs kernel.bpf_stats_enabled)."""
    out = {}
    for fd in sorted(Path(f"/proc/{pid}/fd").iterdir()):
        try:
            if "bpf-prog" not in os.readlink(fd):
                continue
            info = dict(line.split(":\t", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        cnt = int(info.get("run_cnt", "0"))
        if cnt:
            out[info.get("prog_tag", fd.name)] = {
                "run_cnt": cnt, "ns_per_packet": round(int(info["run_time_ns"]) / cnt, 1)}
    return out


def profile_datapath() -> dict:
    tmp = tmpdir("stockade-bench-prof-")
    out, text = {}, ""
    procs = []
    try:
        nb = build_netbench(tmp)
        with Topology(tag="q") as topo:
            srv = topo.add_workload("s", [f"{SUBNET}.1/24"])
            cli = topo.add_workload("c", [f"{SUBNET}.2/24"])
            procs.append(subprocess.Popen(["ip", "netns", "exec", srv.ns, nb, "server", str(RR_PORT)],
                                          stdout=subprocess.DEVNULL, start_new_session=True))
            time.sleep(0.3)
            with AgentProcess(managed_bridges=[], managed_interfaces=[]) as agent:
                lay = layout(10000)
                lay[len(lay) // 2] = ("client", cli.ip4, [RR_PORT] + lay[0][2][1:])
                for label, ip, _ in lay:
                    agent.client.add_ipcache(f"{ip}/32", {"bench-peer": label}, "bench-peer-host")
                agent.client.put_policies([{"name": "p.yaml", "text": stockade_policies(
                    [(lab, ports) for lab, _, ports in lay], SERVER_APP)}])
                for cfg in ("stockade", "nofilter"):
                    if cfg == "stockade":
                        agent.client.add_endpoint(name="bench-server", interface=srv.host_if,
                                                  ips=[srv.ip4], labels={"app": SERVER_APP})
                    else:
                        agent.client.remove_endpoint("bench-server")
                    data = os.path.join(tmp, f"{cfg}.data")
                    stats_path = Path("/proc/sys/kernel/bpf_stats_enabled")
                    stats_before = stats_path.read_text().strip()
                    if cfg == "stockade":
                        stats_path.write_text("1")
                    rr = subprocess.Popen(["ip", "netns", "exec", cli.ns, nb, "rr", srv.ip4,
                                           str(RR_PORT), "4"], stdout=subprocess.PIPE, text=True)
                    time.sleep(0.5)
                    subprocess.run(["perf", "record", "-a", "-g", "-F", "999", "-o", data, "--",
                                    "sleep", "3"], capture_output=True, check=True)
                    try:
                        rate = json.loads(rr.communicate(timeout=30)[0])["rate"]
                        progs = bpf_prog_stats(agent.proc.pid) if cfg == "stockade" else {}
                    finally:
                        stats_path.write_text(stats_before)
                    rows, bpf, report = perf_top(data)
                    out[cfg] = {"rr_per_s": rate, "bpf_prog_pct": bpf, "top": rows}
                    if progs:
                        out[cfg]["bpf_programs"] = progs
                    text += f"==== {cfg}: netbench rr {rate:.0f}/s ====\n{report}\n"
        _out("datapath").write_text(text)
        return {"datapath_rr": out}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)
        rmtree(tmp)


def main(argv=None) -> int:
    parts = (argv or sys.argv[1:]) or ["import", "datapath"]
    res = {}
    if "import" in parts:
        res.update(profile_import())
    if "datapath" in parts:
        res.update(profile_datapath())
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
