"""HTTP through L7 enforcement (the agent's HAProxy) against the same traffic under an
L4-only policy (issue 18.6), and the proxy's own RSS with 1,000 L7 rules.

A real agent process (tests/agentproc.py) and two namespace workloads on one bridge
(tests/netns.py), routed through the host as the L7 tests set them up: client
(app=bench-client) and server (app=bench-server). The server is Debian's HAProxy in the
server's namespace answering every request with a 1,024-byte body (``http-request
return``: no backend, no file I/O). The load generator is Debian's wrk 4.1, run in the
client's namespace. Two policies for the server's port 8080, through the agent's API:

* L4: ``toPorts`` with the port only -- the tc programs pass the connection;
* L7: the same port with ``rules.http: [{method: GET, path: "/.*"}]`` -- the tc programs
  steer the connection into the host's transparent proxy, which checks every request.

Each applied policy is checked with a POST (403 through L7, 200 under L4) before it is
measured. Per policy, with keep-alive and with ``Connection: close`` (a new connection
per request), wrk runs at saturation (64 connections) and at a fixed concurrency of 8
(``-c 8 -t 2 --latency``); the two policies alternate for ``ROUNDS`` rounds: rates are
the median round's, added latencies the difference of the medians of each round's
percentile. CPU seconds of each process (agent, proxy, server, wrk) per
request are read from /proc during the keep-alive saturation runs: where the L7 cost
goes on this 2-core machine. The L7 saturation runs also give the request log lines
the agent received per request (``log_lines_per_request``: 1.0 unless the proxy dropped
lines its log pipe had no room for, ``log_lines_dropped``) and the agent's CPU per line
it handled (``agent_cpu_us_per_log_line``).

The RSS part writes the configuration and maps the agent would (stockade.l7.haproxy /
rules) for 1,000 rules, starts HAProxy on them as the agent does (user haproxy,
CAP_NET_ADMIN/CAP_NET_RAW only), replaces every rule map through the runtime API as a
policy change would, and reads the proxy's VmRSS: the proxy apart from the agent.

Prints one JSON line (the last): the figures, ``targets`` and ``ok``.
"""
from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import median, rmtree, rss_mb, stop, tmpdir  # puts tests/ on sys.path

from agentproc import AgentProcess  # noqa: E402
from l7env import cnp, l7_settings, route_via_host, wait_proxy  # noqa: E402
from netns import Topology  # noqa: E402
from traffic import eventually  # noqa: E402

WRK = "/usr/bin/wrk"
NET4 = "10.213.118."
HOST4 = f"{NET4}254"
PORT = 8080
BODY = 1024
ROUNDS = 3
DURATION_S = 5
SATURATION_CONNS = 64
FIXED_CONNS = 8
TARGET_RATE_RATIO = 0.50
TARGET_ADDED_P99_MS = 1.0
TARGET_RSS_MB = 60
MODES = {"keepalive": [], "close": ["-H", "Connection: close"]}

L4 = f"""
endpointSelector: {{matchLabels: {{app: bench-server}}}}
ingress:
  - fromEndpoints: [{{matchLabels: {{app: bench-client}}}}]
    toPorts: [{{ports: [{{port: "{PORT}", protocol: TCP}}]}}]
"""
L7 = L4.replace("protocol: TCP}]}]", 'protocol: TCP}], rules: {http: [{method: GET, path: "/.*"}]}}]')

# wrk's own summary as JSON (latency percentiles in microseconds from its histograms).
WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, "non_2xx": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.timeout, e.status, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


def server_config(addr: str) -> str:
    body = ("0123456789abcdef" * (BODY // 16))[:BODY]
    return f"""global
    nbthread 1
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend bench
    bind {addr}:{PORT}
    http-request return status 200 content-type text/plain string "{body}"
"""


def cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` and its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(ns: str, url: str, lua: str, conns: int, mode: str, watch: dict[str, int]) -> dict:
    argv = [WRK, "-t", "2", "-c", str(conns), "-d", f"{DURATION_S}s", "--latency", "-s", lua,
            *MODES[mode], url]
    before = {k: cpu_s(p) for k, p in watch.items()}
    children = _children_cpu_s()
    busy = _machine_busy()
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=DURATION_S + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {err.strip()}")
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    r = json.loads(line.split(" ", 1)[1])
    r["rate_per_s"] = round(r["requests"] / (r["duration_us"] / 1e6), 1)
    r["errors"] = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors",
                                     "timeouts", "non_2xx"))
    if watch and r["requests"]:
        per = {k: (cpu_s(p) - before[k]) for k, p in watch.items()}
        per["wrk"] = _children_cpu_s() - children   # ip netns exec became wrk: our child
        r["cpu_us_per_request"] = {k: round(v * 1e6 / r["requests"], 1) for k, v in per.items()}
        r["machine_busy_pct"] = _machine_busy(busy)
    return r


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _machine_busy(since: tuple[int, int] | None = None):
    """(busy, total) jiffies of all CPUs; with ``since``: the busy percentage since."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    now = (sum(f) - idle, sum(f))
    if since is None:
        return now
    return round(100 * (now[0] - since[0]) / max(1, now[1] - since[1]), 1)


def post_status(client, addr: str) -> int:
    """A POST from the client: 403 when the proxy checks requests, 200 when not."""
    s = client.socket()
    try:
        s.settimeout(5)
        s.connect((addr, PORT))
        s.sendall(f"POST /probe HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return int(data.split(b" ", 2)[1])
    finally:
        s.close()


def apply(agent, client, server, policy: str) -> None:
    agent.client.put_policies([cnp("bench-l7", L7 if policy == "l7" else L4)], replace_all=True)
    if policy == "l7":
        wait_proxy(agent)
        want = 403
    else:
        assert eventually(lambda: not (agent.client.health().get("l7_proxy") or {}).get("l7_ports"),
                          timeout=10)
        want = 200
    # the datapath may lag the health answer by a commit: the probe decides
    got = eventually(lambda: post_status(client, server.ip4) == want, timeout=10)
    if not got:
        raise RuntimeError(f"{policy} policy not in force: POST got {post_status(client, server.ip4)}")


def traffic(run: str) -> dict:
    lua = os.path.join(run, "summary.lua")
    Path(lua).write_text(WRK_LUA)
    cfg = os.path.join(run, "server.cfg")
    with Topology("l7b") as topo:
        client = topo.add_workload("c", [f"{NET4}1/24"])
        server = topo.add_workload("s", [f"{NET4}2/24"])
        route_via_host(topo, f"{HOST4}/24", [client, server])
        # One client address to one server port at ~30,000 new connections a second:
        # without reuse the client's ports sit in TIME_WAIT and each connect() scans
        # them (wrk's CPU per request went 26 -> 700 us after one close-mode run).
        client.exec("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=1024 65535")
        Path(cfg).write_text(server_config(server.ip4))
        srv = subprocess.Popen(["ip", "netns", "exec", server.ns, "haproxy", "-db", "-f", cfg],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            with AgentProcess(**l7_settings("bench")) as agent:
                for name, w, app in (("client", client, "bench-client"),
                                     ("server", server, "bench-server")):
                    agent.client.add_endpoint(name=name, interface=w.host_if, ips=w.ips,
                                              labels={"app": app})
                return measure(agent, client, server, srv, lua)
        finally:
            stop(srv)


def measure(agent, client, server, srv, lua) -> dict:
    url = f"http://{server.ip4}:{PORT}/"
    runs: dict = {p: {m: {"saturation": [], "fixed": []} for m in MODES} for p in ("l4", "l7")}
    proxy_rss = None
    for _ in range(ROUNDS):
        for policy in ("l4", "l7"):
            apply(agent, client, server, policy)
            watch = {"agent": agent.proc.pid, "server": srv.pid}
            if policy == "l7":
                watch["proxy"] = agent.client.health()["l7_proxy"]["pid"]
            for mode in MODES:
                logged = _logged(agent) if policy == "l7" else 0
                dropped = _logged(agent, "dropped") if policy == "l7" else 0
                sat = wrk(client.ns, url, lua, SATURATION_CONNS, mode,
                          watch if mode == "keepalive" else {})
                if policy == "l7":
                    # the proxy drops a line its log pipe has no room for (and counts it):
                    # how many flows the agent got, and its CPU per line it handled
                    time.sleep(2.5)        # the agent reads the proxy's count every 2 s
                    lines = _logged(agent) - logged
                    sat["log_lines_per_request"] = round(lines / max(1, sat["requests"]), 3)
                    sat["log_lines_dropped"] = _logged(agent, "dropped") - dropped
                    if "cpu_us_per_request" in sat and lines:
                        sat["agent_cpu_us_per_log_line"] = round(
                            sat["cpu_us_per_request"]["agent"] * sat["requests"] / lines, 1)
                runs[policy][mode]["saturation"].append(sat)
                runs[policy][mode]["fixed"].append(wrk(client.ns, url, lua, FIXED_CONNS, mode, {}))
            if policy == "l7":
                with open(f"/proc/{watch['proxy']}/status") as f:
                    proxy_rss = next(round(int(x.split()[1]) / 1024, 1) for x in f
                                     if x.startswith("VmRSS:"))
    out: dict = {}
    for policy, modes in runs.items():
        for mode, kinds in modes.items():
            for kind, rs in kinds.items():
                out.setdefault(policy, {}).setdefault(mode, {})[kind] = summarize(rs)
    t = {}
    for mode in MODES:
        l4, l7 = out["l4"][mode], out["l7"][mode]
        t[f"{mode}_rate_ratio"] = round(l7["saturation"]["rate_per_s"] / l4["saturation"]["rate_per_s"], 3)
        t[f"{mode}_rate_ratio_c8"] = round(l7["fixed"]["rate_per_s"] / l4["fixed"]["rate_per_s"], 3)
        # p99 of each round, then the median: one round's scheduling stall does not decide
        t[f"{mode}_p99_added_ms"] = round((l7["fixed"]["p99_us_median_of_rounds"]
                                           - l4["fixed"]["p99_us_median_of_rounds"]) / 1000, 3)
        t[f"{mode}_p50_added_ms"] = round((l7["fixed"]["p50_us_median_of_rounds"]
                                           - l4["fixed"]["p50_us_median_of_rounds"]) / 1000, 3)
    out["targets"] = t
    out["proxy_rss_mb_one_rule_after_load"] = proxy_rss
    return out


def _logged(agent, what: str = "received") -> int:
    """Request log lines the agent's reader received (or the proxy dropped) so far."""
    return (agent.client.health().get("l7_proxy") or {}).get("request_log", {}).get(what, 0)


def summarize(rs: list[dict]) -> dict:
    """The median round's figures (by request rate), with the others' rates beside."""
    rs = sorted(rs, key=lambda r: r["rate_per_s"])
    mid = rs[len(rs) // 2]
    keep = {k: mid[k] for k in ("rate_per_s", "p50_us", "p90_us", "p99_us", "p999_us", "max_us")}
    keep["rates_per_s"] = [r["rate_per_s"] for r in rs]
    for p in ("p50_us", "p99_us"):
        keep[f"{p}_median_of_rounds"] = median([r[p] for r in rs])
    keep["p99_us_of_rounds"] = [r["p99_us"] for r in rs]
    keep["errors"] = sum(r["errors"] for r in rs)
    keep["requests"] = sum(r["requests"] for r in rs)
    for k in ("cpu_us_per_request", "machine_busy_pct", "log_lines_per_request",
              "agent_cpu_us_per_log_line"):
        if k in mid:
            keep[k] = mid[k]
    if any("log_lines_dropped" in r for r in rs):
        keep["log_lines_dropped"] = sum(r.get("log_lines_dropped", 0) for r in rs)
    return keep


# ------------------------------------------------------------------ proxy RSS
def proxy_rss(rules: int, per_set: int, port: int) -> dict:
    """The proxy's RSS with ``rules`` HTTP rules in sets of ``per_set``."""
    from stockade.l7.haproxy import ProxySettings, RuntimeAPI, map_text, render_config, write_atomic
    from stockade.l7.rules import rule_keys
    from stockade.policy.api.ports import HTTPRule

    pw = pwd.getpwnam("haproxy")
    run = Path(tmpdir("stockade-l7-bench-"))
    shutil.chown(run, pw.pw_uid, pw.pw_gid)
    s = ProxySettings(run, port=port, slots=per_set)
    maps: dict[str, dict[str, str]] = {n: {} for n in ["ipcache", "rulesets"] + s.slot_maps()}
    sets = (rules + per_set - 1) // per_set
    for rs in range(1, sets + 1):
        maps["ipcache"][f"10.{rs // 250}.{rs % 250}.1/32"] = str(1000 + rs)
        maps["rulesets"][f"{1000 + rs}:8080:0"] = str(rs)
        for i in range(per_set):
            rule = HTTPRule("GET|POST", f"/api/v{i}/items/[0-9]+(\\?.*)?", f"svc{rs}\\.example",
                            (f"X-Token: t{rs}",))
            for field, key in rule_keys(rs, rule).items():
                maps[f"{field}{i}"][key] = "1"
    write_atomic(s.config_path, render_config(s))
    for name, entries in maps.items():
        write_atomic(s.map_path(name), map_text(entries))
    caps = "+net_admin,+net_raw"
    proc = subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                             "--clear-groups", f"--inh-caps=-all,{caps}",
                             f"--ambient-caps=-all,{caps}", f"--bounding-set=-all,{caps}", "--",
                             "haproxy", "-db", "-f", str(s.config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = RuntimeAPI(s.admin_socket)
        if not eventually(lambda: _answers(api), timeout=10, interval=0.05):
            raise RuntimeError("the proxy did not start")
        started = rss_mb(proc.pid)["VmRSS"]
        t0 = time.perf_counter()
        for name in s.slot_maps():
            api.replace_map(s.map_path(name), maps[name])
        replace_s = time.perf_counter() - t0
        held = sum(1 for line in api.command(f"show map {s.map_path('path0')}").splitlines()
                   if line.strip())
        time.sleep(0.5)
        return {"rules": sets * per_set, "rule_sets": sets,
                "rss_mb_started": started,
                "rss_mb_after_runtime_update": rss_mb(proc.pid)["VmRSS"],
                "runtime_update_s": round(replace_s, 2), "path0_entries_after_update": held}
    finally:
        stop(proc)
        rmtree(str(run))


def _answers(api) -> bool:
    try:
        return "Name: HAProxy" in api.command("show info")
    except Exception:
        return False


def main() -> dict:
    rss = {"sets_250x4": proxy_rss(1000, 4, 15991), "sets_1000x1": proxy_rss(1000, 1, 15991)}
    run = tmpdir("stockade-l7-wrk-")
    try:
        out = traffic(run)
    finally:
        rmtree(run)
    out["rss"] = rss
    t = out["targets"]
    t["proxy_rss_mb_1000_rules"] = max(max(r["rss_mb_started"], r["rss_mb_after_runtime_update"])
                                       for r in rss.values())
    out["ok"] = (t["keepalive_rate_ratio"] >= TARGET_RATE_RATIO
                 and max(t["keepalive_p99_added_ms"], t["close_p99_added_ms"]) < TARGET_ADDED_P99_MS
                 and t["proxy_rss_mb_1000_rules"] < TARGET_RSS_MB)
    return {"bench": "l7", "body_bytes": BODY, "rounds": ROUNDS, "duration_s": DURATION_S,
            "saturation_connections": SATURATION_CONNS, "fixed_connections": FIXED_CONNS, **out}


if __name__ == "__main__":
    print(json.dumps(main()))
