"""What an operator sees of a real agent process: the change log (file and stderr) and the
metrics (on the socket and the TCP listener: the names the alert rules and dashboard
use, per-endpoint drops, no _created series), with real workloads and real packets. The
agent has an etcd: block (a real one-member etcd), so the fleet store's metrics are there."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentproc import STOCKADE, AgentProcess
from etcdcluster import EtcdCluster
from monitoring_files import NOT_FROM_AN_AGENT, used_metrics
from netns import Topology
from policydocs import ingress_policy
from stockade.flows import parse_time
from traffic import eventually, tcp_ok

pytestmark = pytest.mark.root
NET4 = "10.213.91."


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def env():
    with Topology("op") as topo, EtcdCluster(1, name="op") as etcd:
        w = {t: topo.add_workload(t, [f"{NET4}{i}/24"]) for i, t in enumerate(["a", "b"], start=1)}
        etcd.put_subnets("op1", [f"{NET4}0/24"])
        port = free_port()
        proc = AgentProcess(metrics_listen=f"127.0.0.1:{port}", host_name="op1",
                            etcd={"endpoints": etcd.endpoints})
        proc.settings["change_log_path"] = str(proc.run_dir / "log" / "changes.jsonl")
        with proc as agent:
            for name, app in (("a", "web"), ("b", "db")):
                agent.client.add_endpoint(name=f"op-{name}", interface=w[name].host_if,
                                          ips=w[name].ips, labels={"app": app})
            agent.client.put_policies([{"name": "db.yaml",
                                        "text": ingress_policy("op-db", "db", "web", 5432)}])
            yield agent, w, port


def scrape_socket(agent, path="/metrics") -> str:
    with httpx.Client(transport=httpx.HTTPTransport(uds=agent.socket), timeout=10) as c:
        r = c.get(f"http://agent{path}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_change_log_names_who_changed_what(env, tmp_path):
    agent, w, _ = env
    pol = tmp_path / "extra.yaml"
    pol.write_text(ingress_policy("op-extra", "db", "web", 6000))
    agent.cli("policy", "import", str(pol))
    agent.cli("policy", "delete", "op-extra")
    path = agent.settings["change_log_path"]
    with open(path) as f:
        got = [json.loads(line) for line in f]
    assert [(e["action"], e["object"]) for e in got] == [
        ("endpoint.upsert", "op-a"), ("endpoint.upsert", "op-b"), ("policy.import", "op-db"),
        ("policy.import", "op-extra"), ("policy.delete", "op-extra")]
    for e in got:
        assert e["uid"] == 0 and e["source"] == "api"
    # the fixture's calls come from this process, the CLI's from their own
    assert [e["pid"] for e in got[:3]] == [os.getpid()] * 3
    assert all(e["pid"] not in (os.getpid(), agent.proc.pid) for e in got[3:])
    assert got[3]["revision"] + 1 == got[4]["revision"]
    log = agent.log_path.read_text()
    on_stderr = [json.loads(line.split("stockade.changes: ", 1)[1]) for line in log.splitlines()
                 if "stockade.changes: " in line]
    assert on_stderr == got
    assert "HTTP Request" not in log


def test_metrics_on_socket_and_tcp_have_every_name_the_rules_and_dashboard_use(env):
    agent, w, port = env
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)
    assert not tcp_ok(w["a"], w["b"], w["b"].ip4, 6001, timeout=1)
    assert eventually(lambda: any(s.labels == {"state": "connected"} and s.value == 1
                                  for s in samples(scrape_socket(agent))["stockade_kvstore_state"]))
    assert eventually(lambda: any(s.labels == {"endpoint": "op-b", "direction": "ingress"} and s.value >= 1
                                  for s in samples(scrape_socket(agent)).get(
                                      "stockade_endpoint_drop_events_total", [])))
    on_socket = scrape_socket(agent)
    on_v1 = scrape_socket(agent, "/v1/metrics")
    on_tcp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for text in (on_socket, on_v1, on_tcp):
        names = samples(text)
        missing = used_metrics() - NOT_FROM_AN_AGENT - set(names)
        assert not missing, f"used by monitoring/ but not exported: {sorted(missing)}"
        assert not [n for n in names if n.endswith("_created")]
        (info,) = names["stockade_build_info"]
        assert info.value == 1 and info.labels["version"]
        assert names["stockade_healthy"][0].value == 1
        assert names["stockade_unprotected_interfaces"][0].value == 0
        assert {s.labels["state"]: s.value for s in names["stockade_kvstore_state"]} == {
            "connected": 1, "degraded": 0, "disconnected": 0}
        assert names["process_resident_memory_bytes"][0].value > 0
    # one registry: the process collector's start time is the agent's, every scrape
    starts = {samples(t)["process_start_time_seconds"][0].value for t in (on_socket, on_v1, on_tcp)}
    assert len(starts) == 1


def test_observe_since_follow_prints_history_then_follows(env):
    agent, w, _ = env
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)
    proc = subprocess.Popen([*STOCKADE, "observe", "--socket", agent.socket, "--since", "10m", "-f",
                             "-o", "jsonpb", "--to-endpoint", "op-b", "--to-port", "5432"],
                            stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["flow"]["destination"]["pod_name"] == "op-b"
        assert first["flow"]["l4"]["TCP"]["destination_port"] == 5432
        assert first["node_name"] and first["time"] == first["flow"]["time"]
        # a connection made now arrives on the same stream
        marker = time.time()
        assert tcp_ok(w["a"], w["b"], w["b"].ip4, 5432)
        while True:
            line = json.loads(proc.stdout.readline())
            if parse_time(line["time"]) >= marker * 1e9:
                break
        assert line["flow"]["verdict"] == "FORWARDED"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
