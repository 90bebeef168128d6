"""Control plane: time to apply N rules, a one-rule change at N = 100,000, container
start -> enforced latency, and agent memory at 1,000 endpoints.

    .venv/bin/python -m bench.controlplane_bench [apply] [change] [podman] [rss] [ctcut]

apply   From an empty state, time the command until it returns: ``stockade policy
        import FILE`` (a new process: CLI start included; the agent answers once every
        map entry is written), ``iptables-restore`` and ``nft -f`` (both return after
        the kernel committed the ruleset), each in the server namespace of
        bench/datapath_bench.py's layout. After each command the kernel state is
        counted (pinned policy map entries; iptables-save rules; nft set elements) to
        prove everything was in force when it returned. Then one rule of 100,000 is
        changed (a median of 11): Stockade imports one policy file (the peer's CNP with
        one port replaced) through the CLI and over the API alone, iptables replaces the
        rule in place (``iptables -R``) and, as configuration management does, restores
        the whole file; nft swaps one set element in one transaction.
change  The one-rule change of ``apply`` alone (its 100,000 entries put in once over
        the API, no import timings): under a minute.
podman  50 times: ``podman create`` a busybox container labelled app=bench-cli whose
        command is ``netbench probe SERVER 8080`` (5 ms SYN timeout, retried every
        1 ms), take the time, ``podman --hooks-dir DIR start`` it with Stockade's OCI
        hook in DIR (tests/podman.py write_oci_hook); the probe prints the
        CLOCK_MONOTONIC time of its first successful request/reply to a server
        container whose policy admits app=bench-cli only. Latency = success - the call
        of ``podman start`` (a hook that holds the start is counted). The agent follows
        Podman through its API socket and the events log. Also: ``podman start``'s own
        duration, the packets dropped as from an unknown endpoint during the starts, and
        first the same starts with no agent and no hook (what Podman takes by itself).
rss     1,000 static endpoints, each a veth pair (host end in the root namespace with
        the agent's tc programs, peer end in one shared namespace: what 1,000 containers
        look like to the agent, without 1,000 processes) with its own identity, and
        100,000 policy entries (100 ports from the next endpoint's identity each).
ctcut   The conntrack walk that cuts the flows of addresses and endpoints whose identity
        a change moves, on a full 262,144-entry table (bench_ctcut).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

from bench.common import (build_netbench, iptables_rules, median, nft_rules, nsrun, pct,
                          pinned_map_count, policy_pin, remove_netfilter, rmtree, rss_breakdown,
                          rss_mb, stockade_policies, stockade_policies_json, tmpdir)
from bench.datapath_bench import SERVER_APP, SUBNET, peer_ip, MAX_IDS, BASE_PORT

from agentproc import STOCKADE, AgentProcess, endpoint_written_at  # noqa: E402
from agentproc import unknown_endpoint_drops as unknown_endpoint_drops_at  # noqa: E402
from netns import Topology  # noqa: E402

APPLY_NS = (10, 10000, 100000)
CHANGE_AT = 100000
REPEAT = 3
CHANGE_REPEAT = 11    # the one-rule change is quick: a median of more


def layout(n: int):
    k = min(n, MAX_IDS)
    per = max(1, n // k)
    return [(f"p{i}", peer_ip(i), [BASE_PORT + j for j in range(per)]) for i in range(k)]


def add_peers(client, lay) -> None:
    """The layout's peers as remote ipcache entries, one transaction per 5,000."""
    entries = [{"prefix": f"{ip}/32", "labels": {"bench-peer": label},
                "host": "bench-peer-host"} for label, ip, _ in lay]
    for i in range(0, len(entries), 5000):
        client.add_ipcache_entries(entries[i:i + 5000])


def add_server(client, srv) -> None:
    client.add_endpoint(name="bench-server", interface=srv.host_if, ips=[srv.ip4],
                        labels={"app": SERVER_APP})


def write_policy(path: str, lay) -> str:
    """The server's policy admitting each peer of the layout on its ports, as YAML, or
    as JSON when ``path`` ends in .json."""
    render = stockade_policies_json if path.endswith(".json") else stockade_policies
    with open(path, "w") as f:
        f.write(render([(lab, ports) for lab, _, ports in lay], SERVER_APP))
    return path


def stockade_import(agent, path: str) -> float:
    t = time.perf_counter()
    subprocess.run([*STOCKADE, "policy", "import", path], check=True, capture_output=True,
                   env={**os.environ, "STOCKADE_SOCKET": agent.socket}, timeout=120)
    return time.perf_counter() - t


def ns_timed(ns: str, *argv: str, input: str | None = None) -> float:
    t = time.perf_counter()
    nsrun(ns, *argv, input=input)
    return time.perf_counter() - t


def bench_apply() -> dict:
    out: dict = {"n": {}}
    tmp = tmpdir("stockade-bench-cp-")
    try:
        with Topology(tag="a") as topo:
            srv = topo.add_workload("s", [f"{SUBNET}.1/24"])
            with AgentProcess(managed_bridges=[], managed_interfaces=[]) as agent:
                c = agent.client
                add_peers(c, layout(max(APPLY_NS)))
                out["cli_status_s"] = cli_status(agent)
                add_server(c, srv)
                base = pinned_map_count(policy_pin(agent.settings['bpffs_dir']))
                for n in APPLY_NS:
                    lay = layout(n)
                    pairs = [(ip, p) for _, ip, ports in lay for p in ports]
                    pol = write_policy(os.path.join(tmp, f"bench-{n}.yaml"), lay)
                    pol_json = write_policy(os.path.join(tmp, f"bench-{n}.json"), lay)
                    ipt, nft = iptables_rules(pairs), nft_rules(pairs)
                    res = {"stockade_import_s": [], "stockade_import_json_s": [],
                           "stockade_api_s": [], "iptables_restore_s": [], "nft_f_s": []}
                    for _ in range(REPEAT):
                        for key, path in (("stockade_import_s", pol),
                                          ("stockade_import_json_s", pol_json)):
                            c.delete_all_policies()
                            res[key].append(stockade_import(agent, path))
                            got = pinned_map_count(policy_pin(agent.settings['bpffs_dir'])) - base
                            if got != len(pairs):
                                raise RuntimeError(f"stockade: {got} map entries, want {len(pairs)}")
                        c.delete_all_policies()
                        t = time.perf_counter()
                        c.put_policies([pol])
                        res["stockade_api_s"].append(time.perf_counter() - t)
                        res["iptables_restore_s"].append(ns_timed(srv.ns, "iptables-restore", input=ipt))
                        rules = nsrun(srv.ns, "iptables-save").stdout.count("-j ACCEPT") - 2
                        if rules != len(pairs):
                            raise RuntimeError(f"iptables: {rules} rules, want {len(pairs)}")
                        remove_netfilter(srv.ns)
                        res["nft_f_s"].append(ns_timed(srv.ns, "nft", "-f", "-", input=nft))
                        elems = nsrun(srv.ns, "nft", "list", "set", "ip", "stockbench",
                                      "allowed").stdout.count(" . ") - 1  # minus the type line
                        if elems != len(pairs):
                            raise RuntimeError(f"nft: {elems} set elements, want {len(pairs)}")
                        remove_netfilter(srv.ns)
                    out["n"][str(n)] = {k: round(median(v), 4) for k, v in res.items()}
                    out["n"][str(n)]["entries"] = len(pairs)
                mid = out["n"]["10000"]
                out["import_vs_iptables_10000"] = round(
                    mid["stockade_import_s"] / mid["iptables_restore_s"], 2)
                out["api_vs_iptables_10000"] = round(
                    mid["stockade_api_s"] / mid["iptables_restore_s"], 2)
                out["one_rule_change_at_100000"] = one_rule_change(agent, srv, tmp)
                remove_netfilter(srv.ns)
    finally:
        rmtree(tmp)
    return out


def bench_change() -> dict:
    """``apply``'s one-rule change at CHANGE_AT, without the import timings before it."""
    tmp = tmpdir("stockade-bench-cp-")
    try:
        with Topology(tag="c") as topo:
            srv = topo.add_workload("s", [f"{SUBNET}.1/24"])
            with AgentProcess(managed_bridges=[], managed_interfaces=[]) as agent:
                lay = layout(CHANGE_AT)
                add_peers(agent.client, lay)
                add_server(agent.client, srv)
                write_policy(os.path.join(tmp, f"bench-{CHANGE_AT}.yaml"), lay)
                out = {"one_rule_change_at_100000": one_rule_change(agent, srv, tmp)}
                remove_netfilter(srv.ns)
    finally:
        rmtree(tmp)
    return out


def cli_status(agent, times: int = 10) -> float:
    """Median wall time of ``stockade status`` (a new process each time)."""
    got = []
    for _ in range(times):
        t = time.perf_counter()
        subprocess.run([*STOCKADE, "status"], capture_output=True, timeout=30,
                       env={**os.environ, "STOCKADE_SOCKET": agent.socket})
        got.append(time.perf_counter() - t)
    return round(median(got), 4)


def one_rule_change(agent, srv, tmp) -> dict:
    lay = layout(CHANGE_AT)
    pairs = [(ip, p) for _, ip, ports in lay for p in ports]
    agent.client.put_policies([os.path.join(tmp, f"bench-{CHANGE_AT}.yaml")], replace_all=True)
    nsrun(srv.ns, "iptables-restore", input=iptables_rules(pairs))
    nft_tab = nft_rules(pairs)
    res: dict[str, list[float]] = {"stockade_import_s": [], "stockade_api_s": [], "iptables_R_s": [],
                                   "iptables_restore_s": [], "nft_s": []}
    label, ip, ports = lay[0]
    for k in range(CHANGE_REPEAT):
        # Alternate between the original and a changed first port of peer p0.
        new_ports = [BASE_PORT + 100 + k] + ports[1:]
        old = ports[0] if k == 0 else BASE_PORT + 100 + k - 1
        one = os.path.join(tmp, f"one-{k}.yaml")
        with open(one, "w") as f:
            f.write(stockade_policies([(label, new_ports)], SERVER_APP))
        res["stockade_import_s"].append(stockade_import(agent, one))
        with open(one, "w") as f:                 # and back, over the API alone
            f.write(stockade_policies([(label, ports)], SERVER_APP))
        t = time.perf_counter()
        agent.client.put_policies([one])
        res["stockade_api_s"].append(time.perf_counter() - t)
        with open(one, "w") as f:
            f.write(stockade_policies([(label, new_ports)], SERVER_APP))
        agent.client.put_policies([one])
        # iptables: rule 3 is p0's first port (1: ct state, 2: lo).
        res["iptables_R_s"].append(ns_timed(
            srv.ns, "iptables", "-R", "INPUT", "3", "-s", f"{ip}/32", "-p", "tcp", "-m", "tcp",
            "--dport", str(new_ports[0]), "-j", "ACCEPT"))
        changed = [(ip, new_ports[0])] + pairs[1:]
        res["iptables_restore_s"].append(ns_timed(srv.ns, "iptables-restore",
                                                  input=iptables_rules(changed)))
        if k == 0:
            nsrun(srv.ns, "nft", "-f", "-", input=nft_tab)
        res["nft_s"].append(ns_timed(
            srv.ns, "nft", "-f", "-",
            input=(f"delete element ip stockbench allowed {{ {ip} . {old} }}\n"
                   f"add element ip stockbench allowed {{ {ip} . {new_ports[0]} }}\n")))
    out = {k: round(median(v), 4) for k, v in res.items()}
    out["stockade_api_s_min"] = round(min(res["stockade_api_s"]), 4)
    out["stockade_api_s_max"] = round(max(res["stockade_api_s"]), 4)
    out["changes"] = CHANGE_REPEAT
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


# ------------------------------------------------------------------ podman
def unknown_endpoint_drops(agent) -> float:
    """Packets the agent's programs dropped as from or to an unknown (unidentified)
    endpoint, in both directions."""
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for fam in text_string_to_metric_families(agent.client.metrics())
               for s in fam.samples if s.name.startswith("stockade_packets")
               and s.labels.get("verdict") == "DROPPED" and s.labels.get("reason") == "unknown_endpoint")


def bench_podman(starts: int = 50) -> dict:
    from podman import (CONTAINERS_CONF, IMAGE, SESSION_ID, SESSION_LABEL, bridge_name,
                        ensure_image, podman, remove_container, start_container, write_oci_hook)
    from stockade.discovery import DEFAULT_EVENTS_LOG, start_podman_service, stop_podman_service
    tmp = tmpdir("stockade-bench-pm-")
    created: list[str] = []
    svc = None
    try:
        nb = build_netbench(tmp)
        ensure_image()
        svc = start_podman_service(f"{tmp}/podman.sock", containers_conf=str(CONTAINERS_CONF),
                                   log_path=f"{tmp}/podman-service.log")
        policy = f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-srv}}
spec:
  endpointSelector: {{matchLabels: {{app: bench-srv}}}}
  ingress: [{{fromEndpoints: [{{matchLabels: {{app: bench-cli}}}}], toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]}}]
"""
        mount = ("-v", f"{tmp}:/nb:ro")
        agent = AgentProcess(podman_socket=svc.socket_path, podman_events_log=DEFAULT_EVENTS_LOG,
                             managed_bridges=[bridge_name()])
        agent.settings["change_log_path"] = str(agent.run_dir / "changes.jsonl")
        hooks = f"{tmp}/hooks"
        write_oci_hook(hooks, agent.socket)   # the agent's socket path is known before it runs
        srv = start_container(f"skbsrv-{SESSION_ID}", {"app": "bench-srv"},
                              ["/nb/netbench", "server", "8080"], extra_args=mount)
        created.append(srv.id)

        def run_probe(name, app, timeout, hooked=True, ready=None):
            cid = podman("create", "--name", name, "--network", "podman", "--label",
                         f"{SESSION_LABEL}={SESSION_ID}", "--label", f"app={app}", *mount,
                         IMAGE, "/nb/netbench", "probe", srv.ip, "8080", str(timeout)
                         ).stdout.strip().splitlines()[-1]
            created.append(cid)
            t0 = time.monotonic_ns()
            podman(*(("--hooks-dir", hooks) if hooked else ()), "start", cid)
            t1 = time.monotonic_ns()
            ready_ns = ready(name) if ready is not None else None
            podman("wait", cid, timeout=timeout + 30)
            res = json.loads(podman("logs", cid).stdout.strip().splitlines()[-1])
            remove_container(cid)
            created.remove(cid)
            res["ready_ns"], res["interface"] = ready_ns if ready_ns is not None else (None, None)
            res["name"] = name
            # the probe's success on the wall clock (flow events carry wall-clock times)
            if res["ok_ns"] is not None:
                res["ok_wall"] = time.time() - (time.monotonic_ns() - res["ok_ns"]) / 1e9
            return t0, t1, res

        failed = []

        runs: list[dict] = []

        def series(tag, count, hooked=True, ready=None):
            lat_ms, ready_ms, start_ms, tries = [], [], [], []
            for i in range(count):
                t0, t1, res = run_probe(f"skbcli-{SESSION_ID}-{tag}{i}", "bench-cli", 10, hooked,
                                        ready)
                if res["ok_ns"] is None:
                    # Never connected within 10 s: counted at 10 s, and reported.
                    failed.append({"series": tag, "start": i, "agent_ready":
                                   res["ready_ns"] is not None})
                    res["ok_ns"] = t1 + 10 * 10**9
                lat_ms.append((res["ok_ns"] - t0) / 1e6)    # from the call of podman start
                if res["ready_ns"] is not None:
                    ready_ms.append((res["ready_ns"] - t0) / 1e6)
                start_ms.append((t1 - t0) / 1e6)
                tries.append(res["tries"])
                runs.append(res)
            return lat_ms, ready_ms, start_ms, tries

        # No agent, no hook, no filter: what Podman and the kernel take by themselves.
        bare_lat, _, bare_start, _ = series("n", starts, hooked=False)
        with agent:
            agent.client.put_policies([{"name": "bench-srv.yaml", "text": policy}])
            # the server was started before the agent: the agent's listing finds it
            deadline = time.monotonic() + 20
            while not any(e["name"] == srv.name and e.get("state") == "ready"
                          for e in agent.client.endpoints()):
                if time.monotonic() > deadline:
                    raise RuntimeError("server container never became a ready endpoint")
                time.sleep(0.05)

            def ready(name):
                """When the agent's API reports the endpoint ready (polled from start's return)."""
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    for e in agent.client.endpoints():
                        if e["name"] == name and e.get("state") == "ready":
                            return time.monotonic_ns(), e["interface"]
                    time.sleep(0.002)
                return None

            _, _, denied = run_probe(f"skbden-{SESSION_ID}", "bench-other", 1)
            if denied["ok_ns"] is not None:
                raise RuntimeError("a container outside the policy reached the server")
            drops_before = unknown_endpoint_drops(agent)
            runs.clear()
            lat_ms, ready_ms, start_ms, tries = series("a", starts, ready=ready)
            drops = unknown_endpoint_drops(agent) - drops_before
            # of those, the ones after the container's endpoint was written (the hook's
            # doing) and before its probe succeeded: its own traffic dropped as unknown
            late = 0
            for res in runs:
                written = endpoint_written_at(agent.settings["change_log_path"], res["name"])
                if written is None or res["interface"] is None or res.get("ok_wall") is None:
                    continue
                ok_at = datetime.fromtimestamp(res["ok_wall"], timezone.utc)
                late += sum(1 for t in unknown_endpoint_drops_at(agent, res["interface"])
                            if written < t <= ok_at)
        return {"starts": starts, "oci_hook": True,
                "start_to_enforced_ms_p50": round(pct(lat_ms, 50), 2),
                "start_to_enforced_ms_p99": round(pct(lat_ms, 99), 2),
                "start_to_enforced_ms_max": round(max(lat_ms), 2),
                "start_to_agent_ready_ms_p50": round(pct(ready_ms, 50), 2),
                "start_to_agent_ready_ms_p99": round(pct(ready_ms, 99), 2),
                "podman_start_cmd_ms_p50": round(pct(start_ms, 50), 1),
                "podman_start_cmd_ms_p99": round(pct(start_ms, 99), 1),
                "probe_tries_p50": pct(tries, 50), "probe_tries_max": max(tries),
                "unknown_endpoint_drops": int(drops),
                "unknown_endpoint_drops_once_written": late,
                "no_agent_start_to_connected_ms_p50": round(pct(bare_lat, 50), 2),
                "no_agent_start_to_connected_ms_p99": round(pct(bare_lat, 99), 2),
                "no_agent_podman_start_cmd_ms_p50": round(pct(bare_start, 50), 1),
                "no_agent_podman_start_cmd_ms_p99": round(pct(bare_start, 99), 1),
                "never_connected_within_10s": len(failed), "failures": failed,
                "denied_container_blocked": True}
    finally:
        for cid in created:
            remove_container(cid)
        if svc is not None:
            stop_podman_service(svc)
        rmtree(tmp)


# ------------------------------------------------------------------ rss
def bench_rss(n_eps: int = 1000, ports_each: int = 100) -> dict:
    prefix = f"sk{os.getpid()}"
    ns = f"{prefix}ep"
    made_links: list[str] = []
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        batch = []
        for i in range(n_eps):
            host = f"{prefix}e{i}"
            batch.append(f"link add {host} type veth peer name p{i} netns {ns}")
            batch.append(f"link set {host} up")
            made_links.append(host)
        subprocess.run(["ip", "-batch", "-"], input="\n".join(batch), text=True, check=True,
                       capture_output=True)
        with AgentProcess(managed_bridges=[], managed_interfaces=[]) as agent:
            c = agent.client
            pid = agent.proc.pid
            idle = rss_mb(pid)
            t = time.perf_counter()
            for i in range(n_eps):
                c.add_endpoint(name=f"ep{i}", interface=made_links[i],
                               ips=[f"10.215.{i // 250}.{i % 250 + 1}"], labels={"app": f"ep{i}"})
            add_s = time.perf_counter() - t
            with_eps = rss_mb(pid)
            docs = []
            for i in range(n_eps):
                ports = ", ".join(f'{{port: "{9000 + j}", protocol: TCP}}' for j in range(ports_each))
                docs.append(f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: ep{i}}}
spec:
  endpointSelector: {{matchLabels: {{app: ep{i}}}}}
  ingress: [{{fromEndpoints: [{{matchLabels: {{app: ep{(i + 1) % n_eps}}}}}], toPorts: [{{ports: [{ports}]}}]}}]
""")
            t = time.perf_counter()
            c.put_policies([{"name": "rss.yaml", "text": "---\n".join(docs)}])
            pol_s = time.perf_counter() - t
            entries = pinned_map_count(policy_pin(agent.settings['bpffs_dir']))
            full = rss_mb(pid)
            return {"endpoints": n_eps, "policy_map_entries": entries,
                    "rss_idle_mb": idle["VmRSS"], "rss_1000_endpoints_mb": with_eps["VmRSS"],
                    "rss_full_mb": full["VmRSS"], "rss_peak_mb": full["VmHWM"],
                    "rss_by_mapping_mb": rss_breakdown(pid),
                    "add_1000_endpoints_s": round(add_s, 2), "import_entries_s": round(pol_s, 3),
                    "flows": flows_note()}
    finally:
        for name in made_links:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ------------------------------------------------------------------ ctcut
CT_FULL = 262144        # the agent's default ct_map_size
CT_SUBNET = (10 << 24) | (216 << 16)      # peers 10.216.0.0/16 and above


def fill_conntrack(dp, n: int = CT_FULL) -> None:
    """``n`` live IPv4 TCP entries at 8 hooks (ifindex 1-8), peers 10.216.0.0 + i // 4,
    half opened by the endpoint (egress), half toward it."""
    import ctypes as ct

    from stockade.datapath import maps as m
    from stockade.datapath.bpfsys import update_batch
    keys, values = (m.CtKey * n)(), (m.CtValue * n)()
    expires = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 3600 * 10**9
    local = bytes([10, 217, 0, 1])
    for i in range(n):
        k = keys[i]
        k.ifindex, k.proto, k.family = 1 + i % 8, 6, 4
        k.direction = m.DIR_EGRESS if i % 2 else m.DIR_INGRESS
        peer = (CT_SUBNET + i // 4).to_bytes(4, "big")
        saddr, daddr = (local, peer) if k.direction == m.DIR_EGRESS else (peer, local)
        ct.memmove(k.saddr, saddr, 4)
        ct.memmove(k.daddr, daddr, 4)
        k.sport, k.dport = 1024 + i % 50000, 80
        values[i].expires = expires
    for i in range(0, n, 8192):
        count = min(8192, n - i)
        update_batch(dp.table("conntrack").map_fd, ct.byref(keys, i * ct.sizeof(m.CtKey)),
                     ct.byref(values, i * ct.sizeof(m.CtValue)), count)


def peer(i: int) -> str:
    return ".".join(str(b) for b in (CT_SUBNET + i).to_bytes(4, "big"))


def bench_ctcut(repeat: int = 3) -> dict:
    """The conntrack walk of a change that moves addresses or endpoints
    (ConntrackMaps.ct_cut_moved: the flows judged again, here all revoked), on a full table of 262,144 entries: one /32 gaining
    an identity (a new endpoint or ipcache entry), 1,000 of them (one PATCH), a /16
    covering every peer whose addresses all keep their identity (a wide CIDR entry over
    host entries: walked, nothing cut), one endpoint relabelled (all of one hook's
    entries cut). Median of ``repeat`` runs, the table filled again before each."""
    from stockade.daemon.state import IpcacheEntry
    from stockade.daemon.txn import resolution_changed
    from stockade.datapath import Datapath
    settings = {"STOCKADE_PIN_DIR": f"/sys/fs/bpf/stockade-bench-ctcut-{os.getpid()}",
                "CT_MAX": CT_FULL, "POLICY_MAX": 1024, "IPCACHE_MAX": 4096}
    ident = IpcacheEntry(300, "remote", None)
    one = {f"{peer(7)}/32": None}
    many = {f"{peer(i * 50)}/32": None for i in range(1000)}
    held = {f"{peer(i)}/32": ident for i in range(CT_FULL // 4)}
    wide = {"10.216.0.0/16": None}
    cases = {
        "one_address": (set(), one, {p: ident for p in one}),
        "1000_addresses": (set(), many, {p: ident for p in many}),
        "wide_prefix_nothing_moved": (set(), wide, {**held, "10.216.0.0/16": ident}),
        "one_endpoint": ({3}, {}, {}),
    }
    dp = Datapath(settings)
    try:
        dp.flush()
        runs: dict[str, list[float]] = {c: [] for c in cases}
        cut: dict[str, int] = {}
        for _ in range(repeat):
            for case, (ifindexes, moved, after) in cases.items():
                fill_conntrack(dp)
                t = time.perf_counter()
                cut[case] = dp.ct_cut_moved(ifindexes, moved, resolution_changed(after, moved),
                                             lambda *flow: False)
                runs[case].append(time.perf_counter() - t)
        out: dict = {"entries": CT_FULL, "repeat": repeat}
        for case in cases:
            out[case] = {"ms": round(median(runs[case]) * 1000, 1), "cut": cut[case]}
        return out
    finally:
        dp.remove_pins()
        dp.close()


def flows_note() -> str:
    from pathlib import Path
    import stockade
    if not (Path(stockade.__file__).parent / "flows").is_dir():
        return "no flow records: the flows feature is not in the agent yet (RSS is without a flow ring)"
    return "flows module present; RSS above does not fill the flow ring (see bench.flows_bench)"


def main(argv=None) -> int:
    parts = (argv or sys.argv[1:]) or ["apply", "podman", "rss", "ctcut"]
    out = {}
    if "apply" in parts:
        out["apply"] = bench_apply()
        print(f"apply: {json.dumps(out['apply'])}", file=sys.stderr, flush=True)
    if "change" in parts and "apply" not in parts:
        out["apply"] = bench_change()
        print(f"change: {json.dumps(out['apply'])}", file=sys.stderr, flush=True)
    if "podman" in parts:
        out["podman"] = bench_podman()
        print(f"podman: {json.dumps(out['podman'])}", file=sys.stderr, flush=True)
    if "rss" in parts:
        out["rss"] = bench_rss()
        print(f"rss: {json.dumps(out['rss'])}", file=sys.stderr, flush=True)
    if "ctcut" in parts:
        out["ctcut"] = bench_ctcut()
        print(f"ctcut: {json.dumps(out['ctcut'])}", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
