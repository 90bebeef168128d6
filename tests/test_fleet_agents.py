"""The fleet store between real agents in-process (their reconciler, model, engine and
state store over a recording datapath) and a real etcd: publishing, watching, address
ownership, precedence of API entries, address reuse, restart, the persisted view.
Enforcement with real packets, TLS, RBAC and the failure cases: tests/root/test_fleet_etcd.py."""
from __future__ import annotations

import json
import time

import pytest

from etcdcluster import EtcdCluster
from recording_datapath import RecordingDatapath
from stockade.daemon.agent import Agent
from stockade.daemon.api import AgentAPI
from stockade.daemon.config import AgentConfig, EtcdConfig
from stockade.kvstore import EtcdClient

pytestmark = pytest.mark.pure
P = "/stockade/v1"


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def etcd():
    with EtcdCluster(1, name="fleetpure") as c:
        c.put_subnets("h1", ["10.77.1.0/24"])
        c.put_subnets("h2", ["10.77.2.0/24"])
        yield c


@pytest.fixture
def kv(etcd):
    c = EtcdClient(etcd.endpoints)
    yield c
    c.delete_prefix(f"{P}/endpoints/".encode())
    c.delete_prefix(f"{P}/nodes/".encode())
    c.close()


def start_agent(tmp_path, etcd, host, ttl=3) -> AgentAPI:
    cfg = AgentConfig(state_dir=str(tmp_path / host), host_name=host, podman_socket=None,
                      docker_socket=None, podman_events_log=None,
                      etcd={"endpoints": etcd.endpoints, "lease_ttl": ttl}).validate()
    agent = Agent(cfg)
    agent.start(RecordingDatapath(), watch_links=False, watch_runtimes=False, flows=False)
    return AgentAPI(agent)


def entry(api: AgentAPI, prefix: str) -> dict | None:
    return next((e for e in api.list_ipcache() if e["prefix"] == prefix), None)


def add(api, name, ip, **labels):
    return api.add_endpoint({"name": name, "interface": f"v-{name}", "ips": [ip],
                             "labels": labels})


@pytest.fixture
def agents(tmp_path, etcd, kv):
    made = []

    def make(host, ttl=3):
        api = start_agent(tmp_path, etcd, host, ttl)
        made.append(api)
        return api
    yield make
    for api in made:
        api.agent.stop()


def test_settings():
    cfg = AgentConfig(etcd={"endpoints": ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]}).validate()
    assert cfg.fleet_store == EtcdConfig(["http://10.0.0.1:2379", "http://10.0.0.2:2379"])
    assert AgentConfig(etcd={"endpoints": []}).validate().fleet_store is None
    assert AgentConfig().validate().fleet_store is None
    for bad, field in [({"endpoints": ["https://10.0.0.1:2379"]}, "etcd.ca"),
                       ({"endpoints": ["ftp://x"]}, "etcd.endpoints"),
                       ({"endpoints": ["http://x:1"], "lease_ttl": 1}, "etcd.lease_ttl"),
                       ({"endpoints": ["http://x:1"], "cert": "/c"}, "etcd.cert"),
                       ({"endpoints": ["http://x:1"], "prefix": "rel"}, "etcd.prefix"),
                       ({"endpoints": ["http://x:1"], "colour": "red"}, "etcd")]:
        with pytest.raises(Exception) as exc:
            AgentConfig(etcd=bad).validate()
        assert str(getattr(exc.value, "field", None)).startswith(field), (bad, exc.value)


def test_flags_make_the_etcd_block(tmp_path):
    from stockade.daemon.config import load
    path = tmp_path / "agent.yaml"
    path.write_text("etcd:\n  endpoints: [http://10.0.0.1:2379]\n  lease_ttl: 9\n")
    cfg = load(str(path), {"etcd": {"prefix": "/other"}})
    assert cfg.etcd.prefix == "/other" and cfg.etcd.lease_ttl == 9
    assert cfg.etcd.endpoints == ["http://10.0.0.1:2379"]
    assert load(None, {}).fleet_store is None


def test_publish_watch_reuse_remove(agents, kv):
    h1, h2 = agents("h1"), agents("h2")
    t0 = time.monotonic()
    add(h1, "web", "10.77.1.5", app="web")
    e = wait_for(lambda: entry(h2, "10.77.1.5/32"), what="web at h2")
    assert time.monotonic() - t0 < 1.0
    assert e["source"] == "kvstore" and e["host"] == "h1" and "static:app=web" in e["labels"]
    rec = json.loads(kv.get(f"{P}/endpoints/h1/10.77.1.5".encode()).value)
    assert rec == {"labels": {"static:app": "web"}, "name": "web", "source": "static", "host": "h1"}
    assert kv.get(f"{P}/nodes/h1".encode()) is not None
    # an address given to another workload: the new labels, never the old ones after
    h1.remove_endpoint("web")
    add(h1, "db", "10.77.1.5", app="db")
    wait_for(lambda: (entry(h2, "10.77.1.5/32") or {}).get("labels") == ["static:app=db"],
             what="the new labels at h2")
    h1.remove_endpoint("db")
    wait_for(lambda: entry(h2, "10.77.1.5/32") is None, what="removed at h2")
    st = h2.health()["kvstore"]
    assert st["state"] == "connected" and st["endpoints_reachable"] == 1
    assert st["revision"] > 0 and st["last_event_age_s"] is not None and st["remote_entries"] == 0
    # h1 never applies its own keys
    assert entry(h1, "10.77.1.5/32") is None


def test_ownership_refusals(agents, kv, etcd):
    etcd.put_subnets("h4", ["10.77.0.0/16"])      # claims h2's subnet too
    h2 = agents("h2")
    body = json.dumps({"labels": {"container:app": "evil"}, "name": "x", "source": "podman",
                       "host": "h1"}).encode()
    kv.put(f"{P}/endpoints/h4/10.77.2.9".encode(), body)       # inside h2's subnets
    kv.put(f"{P}/endpoints/h1/10.99.0.1".encode(), body)       # outside h1's subnets
    kv.put(f"{P}/endpoints/h3/10.77.3.1".encode(), body)       # h3 has no subnets
    kv.put(f"{P}/endpoints/h1/10.77.1.7".encode(), json.dumps(
        {"labels": {"reserved:host": ""}, "host": "h1"}).encode())
    kv.put(f"{P}/endpoints/h1/10.77.1.8".encode(), b"not json")
    kv.put(f"{P}/endpoints/h1/10.77.1.6".encode(), json.dumps(
        {"labels": {f"container:k{i}": "v" for i in range(100)}, "host": "h1"}).encode())
    kv.put(f"{P}/endpoints/h1/10.77.1.9".encode(), body)       # fine
    wait_for(lambda: entry(h2, "10.77.1.9/32"), what="the good one")
    st = wait_for(lambda: (s := h2.health()["kvstore"])["refused_entries"] == 6 and s,
                  what="6 refusals")
    reasons = {r["key"]: r["reason"] for r in st["refusals"]}
    assert "inside this host's subnets" in reasons["endpoints/h4/10.77.2.9"]
    assert "outside h1's subnets" in reasons["endpoints/h1/10.99.0.1"]
    assert "no valid subnets" in reasons["endpoints/h3/10.77.3.1"]
    assert "reserved" in reasons["endpoints/h1/10.77.1.7"]
    assert "more than 64 labels" in reasons["endpoints/h1/10.77.1.6"]
    for ip in ("10.77.2.9", "10.99.0.1", "10.77.3.1", "10.77.1.7", "10.77.1.8"):
        assert entry(h2, f"{ip}/32") is None
    assert h2.health()["status"] == "ok"   # refusals are shown, not an outage
    from stockade.daemon.metrics import render
    text = render(h2.agent)
    assert "stockade_kvstore_refused_entries 6.0" in text and "stockade_kvstore_connected 1.0" in text
    # the refusal goes when the key does
    kv.delete(f"{P}/endpoints/h1/10.99.0.1".encode())
    wait_for(lambda: h2.health()["kvstore"]["refused_entries"] == 5, what="5 refusals")
    etcd.ctl("del", f"{P}/subnets/h4")


def test_an_address_of_this_host_is_refused(agents, kv):
    """A record inside its publisher's subnets that names one of this host's own
    addresses (here h2's, inside h1's subnet) is refused: the address stays the host."""
    from stockade.daemon.changes import HostAddresses
    from stockade.daemon.metrics import render
    h2 = agents("h2")
    h2.agent.submit(HostAddresses(("10.77.1.200",)))
    assert entry(h2, "10.77.1.200/32")["source"] == "host"
    body = json.dumps({"labels": {"container:app": "web"}, "name": "x", "source": "podman",
                       "host": "h1"}).encode()
    kv.put(f"{P}/endpoints/h1/10.77.1.200".encode(), body)
    kv.put(f"{P}/endpoints/h1/10.77.1.9".encode(), body)       # fine
    wait_for(lambda: entry(h2, "10.77.1.9/32"), what="the good one")
    st = wait_for(lambda: (s := h2.health()["kvstore"])["refused_entries"] == 1 and s,
                  what="the refusal")
    assert st["refusals"] == [{"key": "endpoints/h1/10.77.1.200", "reason": "an address of this host"}]
    e = entry(h2, "10.77.1.200/32")
    assert e["source"] == "host" and e["labels"] == ["reserved:host"], e
    assert h2.health()["status"] == "ok"
    assert "stockade_kvstore_refused_entries 1.0" in render(h2.agent)
    kv.delete(f"{P}/endpoints/h1/10.77.1.200".encode())
    wait_for(lambda: h2.health()["kvstore"]["refused_entries"] == 0, what="no refusals")
    assert entry(h2, "10.77.1.200/32")["source"] == "host"


def test_api_entries_take_precedence(agents, kv):
    h1, h2 = agents("h1"), agents("h2")
    add(h1, "web", "10.77.1.5", app="web")
    wait_for(lambda: entry(h2, "10.77.1.5/32"), what="web at h2")
    h2.add_ipcache({"prefix": "10.77.1.5/32", "labels": {"app": "pinned"}, "host": "h1"})
    e = entry(h2, "10.77.1.5/32")
    assert e["source"] == "remote" and e["labels"] == ["remote:app=pinned"]
    st = h2.health()["kvstore"]
    assert {"prefix": "10.77.1.5/32", "reason": "an API entry takes precedence"} in st["conflicts"]
    h1.remove_endpoint("web")
    add(h1, "web", "10.77.1.5", app="web2")        # the store changes behind the API entry
    time.sleep(0.5)
    assert entry(h2, "10.77.1.5/32")["labels"] == ["remote:app=pinned"]
    h2.remove_ipcache("10.77.1.5/32")              # the store's entry takes over
    e = entry(h2, "10.77.1.5/32")
    assert e["source"] == "kvstore" and e["labels"] == ["static:app=web2"]


def test_restart_republishes_and_deletes_stale_keys(tmp_path, etcd, kv, agents):
    h2 = agents("h2")
    h1 = start_agent(tmp_path, etcd, "h1")
    add(h1, "a", "10.77.1.10", app="a")
    add(h1, "b", "10.77.1.11", app="b")
    wait_for(lambda: entry(h2, "10.77.1.11/32"), what="b at h2")
    h1.agent.stop()          # stopped without revoking (as a crash would leave it)
    # while h1 is down its workload b goes (its state file says so) ...
    h1 = start_agent(tmp_path, etcd, "h1")
    h1.remove_endpoint("b")
    wait_for(lambda: kv.get(f"{P}/endpoints/h1/10.77.1.11".encode()) is None, what="b deleted")
    wait_for(lambda: entry(h2, "10.77.1.11/32") is None, what="b gone at h2")
    kv_a = kv.get(f"{P}/endpoints/h1/10.77.1.10".encode())
    assert kv_a.lease in h1.agent.fleet.publisher.leases     # put again on the new lease
    h1.agent.stop()


def test_the_view_is_persisted_and_kept_while_etcd_is_away(tmp_path):
    """An agent that restarts while etcd is down keeps enforcing its last view
    (kvstore.json), status degraded; when etcd is back it lists and applies the
    difference."""
    with EtcdCluster(1, name="fleetpersist") as c:
        c.put_subnets("h1", ["10.77.1.0/24"])
        c.put_subnets("h2", ["10.77.2.0/24"])
        h1 = start_agent(tmp_path, c, "h1")
        h2 = start_agent(tmp_path, c, "h2")
        try:
            add(h1, "a", "10.77.1.10", app="a")
            add(h1, "b", "10.77.1.11", app="b")
            wait_for(lambda: entry(h2, "10.77.1.11/32"), what="b at h2")
            time.sleep(1.2)                                   # kvstore.json written
            wait_for(lambda: (tmp_path / "h2" / "kvstore.json").exists(), what="kvstore.json")
            h2.agent.stop()
            h1.remove_endpoint("b")
            time.sleep(0.3)
            c.kill(0)
            h2 = start_agent(tmp_path, c, "h2")
            assert entry(h2, "10.77.1.11/32")["source"] == "kvstore"
            assert h2.agent.dp.ipcache.get("10.77.1.11/32")
            assert h2.health()["kvstore"]["state"] == "degraded"
            assert h2.health()["status"] == "degraded"
            c.start_member(0)
            c.wait_healthy()
            wait_for(lambda: entry(h2, "10.77.1.11/32") is None, timeout=15, what="b gone")
            assert entry(h2, "10.77.1.10/32")
            wait_for(lambda: h2.health()["kvstore"]["state"] == "connected", timeout=15,
                     what="connected")
        finally:
            h1.agent.stop()
            h2.agent.stop()


def test_published_addresses_are_parsed_strictly_and_canonically():
    """The re-list's fast address parser (inet_pton for IPv4) takes what ipaddress takes
    and gives the same host prefix the rest of the agent uses."""
    import ipaddress

    from stockade.daemon.fleet import _address
    from stockade.daemon.txn import host_prefix
    for text in ("10.77.2.9", "0.0.0.0", "255.255.255.255", "fd00::1", "FD00:0:0::1",
                 "::ffff:10.0.0.1"):
        addr, canonical, prefix = _address(text)
        assert addr == ipaddress.ip_address(text)
        assert canonical == str(addr) and prefix == host_prefix(text)
    for bad in ("010.1.1.1", "1.2.3", "1.2.3.256", "1.2.3.4 ", "0x1.2.3.4", "", "10.0.0.1/32",
                "fd00::g"):
        with pytest.raises(ValueError):
            _address(bad)
