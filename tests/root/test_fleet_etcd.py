"""Live identities across hosts on a real etcd (issue 16): a 3-member etcd cluster with
TLS (peer and client) and per-host RBAC by certificate CN, on a bridge this test makes;
three agents, each in its own network namespace (a simulated host with a routed workload
subnet); real packets between workloads on different hosts.

Each failure case of docs/multihost.md ("Live identities") is one test: a member
killed, quorum lost, an agent killed, an address reused, an agent cut off from etcd,
an agent restarted. Leases are short (3 s) to keep the run short."""
from __future__ import annotations

import json
import time

import pytest

from agentproc import STOCKADE, AgentProcess
from etcdcluster import EtcdCluster
from fleetnet import Fabric
from stockade.kvstore import EtcdClient, PermissionDenied
from traffic import tcp_ok

pytestmark = pytest.mark.root
TTL = 3
P = "/stockade/v1"
MEMBERS = ["10.199.0.11", "10.199.0.12", "10.199.0.13"]
PORT = 5432


def cnp(name, spec):
    import textwrap
    return {"name": f"{name}.yaml", "text": (
        f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")}


DB_FROM_WEB = cnp("db", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
""")


def wait_for(cond, timeout=10.0, what="condition", interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def entry(agent, prefix):
    return next((e for e in agent.client.ipcache() if e["prefix"] == prefix), None)


def kvstore(agent):
    return agent.client.health()["kvstore"]


class Env:
    def __init__(self, fab, cluster, agents):
        self.fab, self.cluster, self.agents = fab, cluster, agents
        self.h = fab.hosts

    def agent_for(self, host):
        cert, key = self.cluster.ca.client(host)
        a = AgentProcess(
            command=["ip", "netns", "exec", self.h[host].ns, *STOCKADE], host_name=host,
            bpffs_dir=f"{self.h[host].bpffs}/sk", managed_bridges=["wbr0"],
            etcd={"endpoints": self.cluster.endpoints, "ca": str(self.cluster.ca.ca_path),
                  "cert": cert, "key": key, "lease_ttl": TTL})
        return a

    def add(self, host, name, labels):
        w = self.h[host].workloads[name]
        return self.agents[host].client.add_endpoint(name=name, interface=f"{name}-h",
                                                     ips=[w.ip], labels=labels)


@pytest.fixture(scope="module")
def env():
    with Fabric("fl") as fab:
        for a in MEMBERS:
            fab.add_address(a)
        for i, name in enumerate(["h1", "h2", "h3"], start=1):
            fab.add_host(name, i)
        fab.route_all()
        h = fab.hosts
        h["h1"].add_workload("web", 10)
        h["h1"].add_workload("other", 11)
        h["h2"].add_workload("db", 10)
        h["h2"].add_workload("db2", 11)
        h["h3"].add_workload("cache", 10)
        h["h3"].add_workload("store", 11)
        with EtcdCluster(3, addresses=MEMBERS, tls=True, name="fl") as cluster:
            cluster.enable_rbac(["h1", "h2", "h3"])
            for host in h.values():
                cluster.put_subnets(host.name, [host.subnet])
            agents: dict[str, AgentProcess] = {}
            env = Env(fab, cluster, agents)
            try:
                for name in h:
                    agents[name] = env.agent_for(name).start()
                    agents[name].client.put_policies([DB_FROM_WEB])
                env.add("h2", "db", {"app": "db"})
                env.add("h2", "db2", {"app": "db"})
                yield env
            finally:
                for a in agents.values():
                    a.stop()


def web_to_db(env, src="web", host="h1"):
    return tcp_ok(env.h[host].workloads[src], env.h["h2"].workloads["db"],
                  env.h["h2"].workloads["db"].ip, PORT, timeout=0.5)


def test_a_workload_reaches_another_host_by_label_within_a_second(env):
    a = env.agents
    wait_for(lambda: all(kvstore(x)["state"] == "connected" for x in a.values()),
             what="every agent connected")
    assert not web_to_db(env)          # h2 does not know web yet: world, dropped
    env.add("h1", "web", {"app": "web"})
    env.add("h1", "other", {"app": "other"})
    ready = time.monotonic()
    wait_for(lambda: entry(a["h2"], "10.78.1.10/32"), what="web at h2", interval=0.01)
    took = time.monotonic() - ready
    assert took < 1.0, took
    e = entry(a["h2"], "10.78.1.10/32")
    assert e["source"] == "kvstore" and e["host"] == "h1" and "static:app=web" in e["labels"]
    wait_for(lambda: entry(a["h3"], "10.78.1.10/32"), timeout=1.0, what="web at h3")
    wait_for(lambda: entry(a["h2"], "10.78.1.11/32"), what="other at h2")
    assert web_to_db(env)
    assert not web_to_db(env, "other")
    # node records became remote-node entries
    node = entry(a["h2"], "10.199.0.21/32")
    assert node and node["source"] == "kvstore" and node["labels"] == ["reserved:remote-node"]
    st = kvstore(a["h2"])
    assert st["endpoints_reachable"] == 3 and st["refused_entries"] == 0 and st["remote_entries"] >= 4
    # the status shows the block, as JSON and as text
    out = json.loads(a["h2"].cli("status", "-o", "json").stdout)
    assert out["kvstore"]["state"] == "connected"
    assert "kvstore: connected" in a["h2"].cli("status").stdout


def test_rbac_lets_a_host_write_only_its_own_keys_and_foreign_addresses_are_refused(env):
    cert, key = env.cluster.ca.client("h1")
    c = EtcdClient(env.cluster.endpoints, ca=str(env.cluster.ca.ca_path), cert=cert, key=key)
    try:
        for k in (f"{P}/endpoints/h2/10.78.2.10", f"{P}/nodes/h2", f"{P}/subnets/h1"):
            with pytest.raises(PermissionDenied):
                c.put(k.encode(), b"{}")
        # allowed by RBAC (its own prefix), refused by every reader: h2's address
        forged = json.dumps({"labels": {"static:app": "web"}, "name": "x", "source": "static",
                             "host": "h1"}).encode()
        c.put(f"{P}/endpoints/h1/10.78.2.11".encode(), forged)
        st = wait_for(lambda: (s := kvstore(env.agents["h3"]))["refused_entries"] >= 1 and s,
                      what="the refusal at h3")
        assert {"key": "endpoints/h1/10.78.2.11", "reason": "outside h1's subnets"} in st["refusals"]
        wait_for(lambda: kvstore(env.agents["h2"])["refused_entries"] >= 1, what="h2 refuses")
        assert entry(env.agents["h3"], "10.78.2.11/32")["source"] == "kvstore"   # h2's own db2
        assert "refused" in env.agents["h3"].cli("status").stdout
        c.delete(f"{P}/endpoints/h1/10.78.2.11".encode())
        wait_for(lambda: kvstore(env.agents["h3"])["refused_entries"] == 0, what="no refusals")
    finally:
        c.close()


def test_one_member_killed_changes_nothing(env):
    cluster, a = env.cluster, env.agents
    cluster.kill(0)
    try:
        end = time.monotonic() + 2 * TTL
        while time.monotonic() < end:
            assert web_to_db(env)
            time.sleep(0.1)
        for x in a.values():
            st = kvstore(x)
            assert st["state"] == "connected", st
        assert entry(a["h2"], "10.78.1.10/32")
    finally:
        cluster.start_member(0)
        cluster.wait_healthy()


def test_address_reused_gets_the_new_labels_everywhere_within_a_second(env):
    a = env.agents
    assert web_to_db(env)
    a["h1"].client.remove_endpoint("web")
    # the same address, interface and namespace: now a workload without app=web
    a["h1"].client.add_endpoint(name="intruder", interface="web-h", ips=["10.78.1.10"],
                                labels={"app": "intruder"})
    ready = time.monotonic()
    wait_for(lambda: (entry(a["h2"], "10.78.1.10/32") or {}).get("labels") == ["static:app=intruder"],
             what="the new labels at h2", interval=0.01)
    assert time.monotonic() - ready < 1.0
    wait_for(lambda: (entry(a["h3"], "10.78.1.10/32") or {}).get("labels") == ["static:app=intruder"],
             what="the new labels at h3", timeout=1.0)
    for _ in range(5):
        assert not web_to_db(env)       # never the old labels after that
    a["h1"].client.remove_endpoint("intruder")
    env.add("h1", "web", {"app": "web"})
    wait_for(lambda: web_to_db(env), what="web back")


def test_quorum_lost_keeps_the_last_view_then_resyncs(env):
    cluster, a, h1, h3 = env.cluster, env.agents, env.h["h1"].workloads, env.h["h3"].workloads
    # h3's last view holds web and other (h1's)
    for ip, labels in (("10.78.1.10/32", ["static:app=web"]), ("10.78.1.11/32", ["static:app=other"])):
        wait_for(lambda ip=ip, labels=labels: (entry(a["h3"], ip) or {}).get("labels") == labels,
                 what=f"{ip} at h3")
    cluster.kill(1)
    cluster.kill(2)
    try:
        for x in a.values():
            wait_for(lambda x=x: kvstore(x)["state"] == "degraded", timeout=3 * TTL,
                     what="degraded")
        assert a["h2"].client.health()["status"] == "degraded"
        assert web_to_db(env)                              # the last view is enforced
        assert not web_to_db(env, "other")
        assert not tcp_ok(h1["other"], env.h["h2"].workloads["db2"],
                          env.h["h2"].workloads["db2"].ip, PORT, timeout=0.5)
        assert tcp_ok(h1["web"], env.h["h2"].workloads["db2"],
                      env.h["h2"].workloads["db2"].ip, PORT, timeout=0.5)
        # new local workloads are still enforced locally: store (app=db, so db's policy
        # selects it) and cache (app=web), both started on h3 while nothing can be published
        env.add("h3", "cache", {"app": "web"})
        env.add("h3", "store", {"app": "db"})
        store = h3["store"]
        assert tcp_ok(h1["web"], store, store.ip, PORT, timeout=0.5)      # web, the last view
        assert not tcp_ok(h1["other"], store, store.ip, PORT, timeout=0.5)
        assert tcp_ok(h3["cache"], store, store.ip, PORT, timeout=0.5)    # a local peer
        assert not web_to_db(env, "cache", "h3")    # h2 cannot learn cache yet: world there
        assert entry(a["h2"], "10.78.3.10/32") is None
    finally:
        cluster.start_member(1)
        cluster.start_member(2)
    cluster.wait_healthy()
    for x in a.values():
        wait_for(lambda x=x: kvstore(x)["state"] == "connected", timeout=20, what="connected again")
    # what h3 started during the outage reaches h2 without a restart
    wait_for(lambda: entry(a["h2"], "10.78.3.10/32"), timeout=10, what="cache at h2")
    assert web_to_db(env, "cache", "h3")
    wait_for(lambda: (entry(a["h1"], "10.78.3.11/32") or {}).get("labels") == ["static:app=db"],
             timeout=10, what="store at h1")
    a["h3"].client.remove_endpoint("store")
    wait_for(lambda: entry(a["h1"], "10.78.3.11/32") is None, what="store gone at h1")


def test_partitioned_agent_keeps_its_view_and_the_others_drop_its_workloads(env):
    a, h3 = env.agents, env.h["h3"]
    assert entry(a["h2"], "10.78.3.10/32")
    rule = ["nft", "add", "table", "inet", "flpart"]
    h3.exec(*rule)
    h3.exec("nft", "add", "chain", "inet", "flpart", "out",
            "{ type filter hook output priority 0 ; }")
    h3.exec("nft", "add", "rule", "inet", "flpart", "out", "ip", "daddr",
            "{ " + ", ".join(MEMBERS) + " }", "drop")
    try:
        cut = time.monotonic()
        wait_for(lambda: entry(a["h2"], "10.78.3.10/32") is None, timeout=TTL + 2,
                 what="cache dropped at h2 after h3's lease", interval=0.1)
        assert time.monotonic() - cut <= TTL + 2
        assert not web_to_db(env, "cache", "h3")          # its address is world now
        wait_for(lambda: entry(a["h1"], "10.78.3.10/32") is None, timeout=2, what="at h1 too")
        # h3 keeps enforcing its last view
        assert entry(a["h3"], "10.78.1.10/32")["source"] == "kvstore"
        wait_for(lambda: kvstore(a["h3"])["state"] == "degraded", timeout=2 * TTL, what="degraded")
    finally:
        h3.exec("nft", "delete", "table", "inet", "flpart", check=False)
    # back: h3's lease expired meanwhile; it grants a new one and publishes again
    wait_for(lambda: entry(a["h2"], "10.78.3.10/32"), timeout=20, what="cache back at h2")
    st = wait_for(lambda: (s := kvstore(a["h3"]))["state"] == "connected" and s, timeout=10,
                  what="h3 connected")
    assert st["leases_lost"] >= 1


def test_killed_agent_disappears_within_its_lease_and_a_restart_cleans_up(env):
    a = env.agents
    assert web_to_db(env, "cache", "h3")
    # a stale key of h3's (a workload that went while its agent was down)
    env.cluster.ctl("put", f"{P}/endpoints/h3/10.78.3.99", json.dumps(
        {"labels": {"static:app": "gone"}, "name": "gone", "source": "static", "host": "h3"}),
        user="h3")
    wait_for(lambda: entry(a["h2"], "10.78.3.99/32"), what="the stale key at h2")
    a["h3"].kill()
    killed = time.monotonic()
    wait_for(lambda: entry(a["h2"], "10.78.3.10/32") is None and entry(a["h1"], "10.78.3.10/32") is None,
             timeout=TTL + 2, what="h3's endpoints gone everywhere", interval=0.1)
    assert time.monotonic() - killed <= TTL + 2
    assert not web_to_db(env, "cache", "h3")     # world: fail closed
    # restarted: everything published again, the stale key (on no lease) deleted
    a["h3"].start()
    wait_for(lambda: entry(a["h2"], "10.78.3.10/32"), timeout=10, what="cache back at h2")
    wait_for(lambda: not env.cluster.ctl("get", f"{P}/endpoints/h3/10.78.3.99", user="h3").stdout,
             timeout=5, what="the stale key deleted")
    wait_for(lambda: web_to_db(env, "cache", "h3"), what="cache allowed again")
