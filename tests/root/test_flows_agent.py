"""Flow visibility end to end: a real agent process, real BPF events, real packets.

Workloads a (app=web), b (app=db) and c (app=other) are static endpoints on one
bridge; b only accepts TCP 5432 from web. One agent serves every test (with a flow
log and the TCP metrics listener on), so the tests select their flows by filters.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentproc import AgentProcess
from netns import Topology
from traffic import eventually, tcp_ok

pytestmark = pytest.mark.root

NET4, NET6 = "10.213.40.", "fd57:ade:40::"
POLICY = {"name": "db.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-from-web}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: web}}]
      toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""}
FLOOD_PACKETS = 200_000


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def env():
    with Topology("f") as topo:
        w = {t: topo.add_workload(t, [f"{NET4}{i}/24", f"{NET6}{i}/64"])
             for i, t in enumerate(["a", "b", "c"], start=1)}
        port = free_port()
        proc = AgentProcess(metrics_listen=f"127.0.0.1:{port}")
        proc.settings.update(flow_log_path=str(proc.run_dir / "flows" / "flows.log"),
                             flow_log_max_bytes=20000, flow_log_backups=2)
        with proc as agent:
            for name, app in (("a", "web"), ("b", "db"), ("c", "other")):
                agent.client.add_endpoint(name=name, interface=w[name].host_if, ips=w[name].ips,
                                          labels={"app": app})
            agent.client.put_policies([POLICY], replace_all=True)
            yield agent, w, port


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def flows(agent, **criteria):
    return agent.client.flows(**criteria)


def test_allowed_connection_recorded_at_both_hooks(env):
    agent, w, _ = env
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)
    res = eventually(lambda: (r := flows(agent, from_label="app=web", to_label="app=db",
                                         port=5432, since=since))["count"] >= 2 and r)
    assert res, "no flow records for web -> db"
    recs = res["flows"]
    assert {f["direction"] for f in recs} == {"egress", "ingress"}
    assert res["connections"] == 1, "both hooks of one connection count once"
    ing = next(f for f in recs if f["direction"] == "ingress")
    assert ing["verdict"] == "FORWARDED" and ing["drop_reason"] is None
    assert ing["l4"]["protocol"] == "tcp" and ing["l4"]["destination_port"] == 5432
    assert "SYN" in ing["l4"]["tcp_flags"] and not ing["is_reply"]
    assert ing["ip"] == {"source": w["a"].ip4, "destination": w["b"].ip4}
    assert "k8s:app=web" in ing["source"]["labels"] or any(
        l.endswith(":app=web") for l in ing["source"]["labels"])
    assert ing["source"]["endpoint"]["name"] == "a"
    assert ing["destination"]["endpoint"]["name"] == "b"
    assert any("db-from-web" in p for p in ing["policy"]), ing["policy"]
    assert ing["policy_match"] == "allow"
    assert ing["interface"]["name"] == w["b"].host_if


def test_denied_connection_has_reason_and_no_policy(env):
    agent, w, _ = env
    w["c"].exec("ping", "-c1", "-W2", w["b"].ip6, check=False)  # neighbour discovery first
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    assert not tcp_ok(w["c"], w["b"], w["b"].ip6, 5432)
    res = eventually(lambda: (r := flows(agent, verdict="DROPPED", from_label="app=other",
                                         since=since))["count"] >= 1 and r)
    assert res, (since, [(f["time"], f["verdict"], f["source"]["labels"], f["ip"])
                         for f in flows(agent, last=10)["flows"]])
    f = res["flows"][0]
    assert f["drop_reason"] == "policy_denied" and f["direction"] == "ingress"
    assert f["ip_version"] == 6 and f["ip"]["destination"] == w["b"].ip6
    assert f["policy"] == [] and f["policy_match"] == "default-deny"
    # the sender's own egress was not enforced: forwarded there
    fwd = flows(agent, verdict="FORWARDED", from_label="app=other", to_label="app=db",
                since=since)
    assert fwd["count"] >= 1 and fwd["flows"][0]["policy_match"] == "not-enforced"


@pytest.mark.parametrize("criteria", [
    {"verdict": ["DROPPED"]},
    {"verdict": ["FORWARDED", "DROPPED"], "to_label": "app=db"},
    {"from_label": ["app=web", "app=other"]},
    {"protocol": "tcp", "port": 5432},
    {"ip": NET4 + "0/24"},
    {"direction": "egress"},
    {"last": 3},
], ids=["verdict", "verdict-or-and-label", "label-or", "proto-port", "cidr", "direction", "last"])
def test_api_filters_agree_with_local_filtering(env, criteria):
    """The API's answer is exactly the unfiltered list filtered by hand."""
    agent, w, _ = env
    everything = flows(agent)["flows"]

    def keep(f):
        ok = True
        if "verdict" in criteria:
            ok &= f["verdict"] in criteria["verdict"]
        if "to_label" in criteria:
            ok &= any(l.endswith(":app=db") for l in f["destination"]["labels"])
        if "from_label" in criteria:
            ok &= any(l.endswith((":app=web", ":app=other")) for l in f["source"]["labels"])
        if "protocol" in criteria:
            ok &= f["l4"]["protocol"] == "tcp" and 5432 in (f["l4"]["source_port"],
                                                            f["l4"]["destination_port"])
        if "ip" in criteria:
            ok &= any(a.startswith(NET4) for a in f["ip"].values())
        if "direction" in criteria:
            ok &= f["direction"] == "egress"
        return ok
    got = flows(agent, **criteria)["flows"]
    if "last" in criteria:
        assert got == everything[-3:] or len(got) == 3
        return
    want = [f for f in everything if keep(f)]
    assert got[:len(want)] == want and len(want) > 0


def test_follow_streams_new_flows(env):
    agent, w, _ = env
    got, ready = [], threading.Event()

    def reader():
        from stockade.client import Client
        with Client(agent.socket) as c:
            ready.set()
            for f in c.follow_flows(from_label="app=web", port=5432):
                got.append(f)
                if len(got) >= 2:
                    return
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    ready.wait(5)
    time.sleep(0.3)
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)
    t.join(10)
    assert len(got) >= 2 and all(f["source"]["endpoint"]["name"] == "a" for f in got)


def test_observe_cli_json_and_table(env):
    agent, w, _ = env
    tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)
    r = eventually(lambda: (x := agent.cli("observe", "--verdict", "DROPPED", "--to-label",
                                           "app=db", "--last", "5", "-o", "json")).stdout and x)
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert 1 <= len(lines) <= 5
    for f in lines:
        for key in ("time", "verdict", "drop_reason", "direction", "ip", "l4", "source",
                    "destination", "policy"):
            assert key in f
        assert set(f["l4"]) >= {"protocol", "source_port", "destination_port"}
        assert set(f["source"]) >= {"identity", "labels", "endpoint"}
        assert f["verdict"] == "DROPPED"
    table = agent.cli("observe", "--verdict", "DROPPED", "--protocol", "tcp", "--last", "2").stdout
    assert "DROPPED" in table and "\x1b[" not in table  # no colour off a terminal
    bad = agent.cli("observe", "--since", "yesterday", check=False)
    assert bad.returncode == 1 and "since" in bad.stderr


def test_metrics_on_api_and_tcp(env):
    agent, w, port = env
    before = agent.client.metrics()
    tcp_ok(w["c"], w["b"], w["b"].ip4, 5432)
    key = dict(verdict="DROPPED", direction="ingress", reason="policy_denied")
    assert eventually(lambda: metric(agent.client.metrics(), "stockade_flow_verdicts_total", **key)
                      > metric(before, "stockade_flow_verdicts_total", **key))
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert metric(text, "stockade_packets_total", direction="ingress", verdict="DROPPED",
                  reason="policy_denied") > metric(before, "stockade_packets_total",
                                                   direction="ingress", verdict="DROPPED",
                                                   reason="policy_denied")
    for m in ("endpoints", "ipcache4", "policy", "policy_flags", "conntrack", "ipcache6"):
        ratio = metric(text, "stockade_map_fill_ratio", map=m)
        assert 0 < ratio < 1 or (m == "ipcache6" and ratio >= 0), m
    assert metric(text, "stockade_endpoints") == 3
    assert metric(text, "stockade_policy_revision") >= 1
    assert metric(text, "stockade_identities") >= 3
    assert metric(text, "stockade_ipcache_entries") >= 6
    assert metric(text, "stockade_conntrack_entries") >= 1
    assert metric(text, "stockade_policy_apply_seconds_count") >= 1
    assert "stockade_flow_events_lost_total" in text
    assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=10).status_code == 404


def test_flow_log_json_lines(env):
    agent, w, _ = env
    path = agent.run_dir / "flows" / "flows.log"
    tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)
    assert eventually(lambda: path.exists() and path.stat().st_size > 0)
    lines = [json.loads(l) for l in path.read_text().splitlines() if l]
    assert lines and all({"time", "verdict", "source", "destination"} <= set(l) for l in lines)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def _tx_dropped(w) -> int:
    out = w.exec("ip", "-s", "-j", "link", "show", "eth0").stdout
    return json.loads(out)[0]["stats64"]["tx"]["dropped"]


def test_flood_of_drops(env):
    """200,000 denied UDP packets from c: drop counters exact, agent memory bounded by
    its ring, events over the drop budget counted as lost, and an allowed connection
    made during the flood is still recorded."""
    agent, w, _ = env
    pid = agent.proc.pid
    rss_before = _rss_kb(pid)
    key = dict(direction="ingress", verdict="DROPPED", reason="policy_denied")
    dropped_before = metric(agent.client.metrics(), "stockade_packets_total", **key)
    lost_before = flows(agent, last=1)["events_lost"]
    txd_before = _tx_dropped(w["c"])
    sock = w["c"].socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    allowed_ok = []

    def allowed():
        time.sleep(0.2)
        allowed_ok.append(tcp_ok(w["a"], w["b"], w["b"].ip4, 5432, timeout=5))

    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    t = threading.Thread(target=allowed)
    t.start()
    try:
        payload, dst = b"f" * 16, (w["b"].ip4, 9999)
        for _ in range(FLOOD_PACKETS):
            try:
                sock.sendto(payload, dst)
                sent += 1
            except OSError:  # ENOBUFS: not sent, not counted
                pass
    finally:
        sock.close()
        t.join(15)
    assert allowed_ok == [True]
    lost_at_veth = _tx_dropped(w["c"]) - txd_before
    expected = dropped_before + sent - lost_at_veth
    assert sent - lost_at_veth >= FLOOD_PACKETS * 0.99
    assert eventually(lambda: metric(agent.client.metrics(), "stockade_packets_total", **key)
                      == expected, timeout=5), "drop counters must be exact"
    rec = eventually(lambda: (r := flows(agent, from_label="app=web", to_label="app=db",
                                         port=5432, since=start))["count"] >= 2 and r)
    assert rec, "allowed connection during the flood was not recorded"
    lost = flows(agent, last=1)["events_lost"]
    assert lost["rate_limit_drop"] > lost_before.get("rate_limit_drop", 0)
    res = flows(agent, verdict="DROPPED", port=9999, since=start)
    assert 0 < res["count"] < sent, "drop events are rate limited, not one per packet"
    assert res["buffer"]["size"] <= res["buffer"]["capacity"]
    growth_mb = (_rss_kb(pid) - rss_before) / 1024
    assert growth_mb < 50, f"agent RSS grew by {growth_mb:.1f} MB"
    # the flow log rotated under the flood and kept its number of backups
    logs = sorted(p.name for p in (agent.run_dir / "flows").iterdir())
    assert logs == ["flows.log", "flows.log.1", "flows.log.2"]


def test_old_flows_keep_the_policy_that_decided_them(env):
    """A flow names what decided it when it happened (the policy_id in the policy map's
    value, carried by the event), not what decides such a flow now."""
    agent, w, _ = env
    renamed = {"name": "db2.yaml", "text": POLICY["text"].replace("db-from-web", "db-from-web-v2")}
    try:
        assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)
        agent.client.put_policies([renamed], replace_all=True)
        assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)

        def both():
            got = agent.client.flows(to_port=5432, verdict="FORWARDED", direction="ingress")["flows"]
            return {tuple(f["policy"]) for f in got} >= {("db-from-web",), ("db-from-web-v2",)} and got
        flows = eventually(both)
        assert flows, agent.client.flows(to_port=5432)["flows"][-4:]
        names = [tuple(f["policy"]) for f in flows]
        # every flow before the change names the old policy, every one after the new
        first_new = names.index(("db-from-web-v2",))
        assert set(names[:first_new]) <= {("db-from-web",)} and set(names[first_new:]) == {("db-from-web-v2",)}
    finally:
        agent.client.put_policies([POLICY], replace_all=True)
