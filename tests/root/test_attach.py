"""Owned attachments and self-healing (issue 14.1, 14.2, 14.5): real agents, real veths.

tcx: the agent's programs are BPF links pinned in its bpffs directory: ``tc filter del``
and ``tc qdisc del dev X clsact`` leave them in place, a restart swaps the program in
the same link, a foreign program put ahead of ours (BPF_F_BEFORE, returning OK) is
found, reported and ours goes first again. tc: a removed filter or clsact qdisc is put
back within a second, counted and reported; denied probes sent every 0.5 ms measure how
long the hole lasted.
"""
import json
import os
import subprocess
import time

import pytest
import yaml

from agentproc import STOCKADE, AgentProcess
from netns import Topology, run
from probe import Probe
from stockade.datapath import tcx
from stockade.datapath.attachments import programs_on
from traffic import eventually, tcp_ok, udp_ok

pytestmark = pytest.mark.root

NET4 = "10.213.71."
DENY_C = {"name": "b.yaml", "text": """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-from-a}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress: [{fromEndpoints: [{matchLabels: {app: a}}]}]
"""}


@pytest.fixture
def topo():
    with Topology("at") as t:
        yield t, {n: t.add_workload(n, [f"{NET4}{i}/24"]) for i, n in enumerate("abc", start=1)}


def protect(agent, w):
    for n in "abc":
        agent.client.add_endpoint(name=n, interface=w[n].host_if, ips=w[n].ips, labels={"app": n})
    agent.client.put_policies([DENY_C])
    assert tcp_ok(w["a"], w["b"], w["b"].ip4, 80)
    assert not udp_ok(w["c"], w["b"], w["b"].ip4, 7000)


def repairs(agent) -> float:
    for line in agent.client.metrics().splitlines():
        if line.startswith("stockade_attach_repairs_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no stockade_attach_repairs_total")


def status_json(agent) -> dict:
    r = agent.cli("status", "-o", "json", check=False)
    return json.loads(r.stdout)


def test_tcx_links_survive_tc_removal_and_restart(topo):
    t, w = topo
    b = w["b"]
    agent = AgentProcess(attach_mode="auto")
    try:
        agent.start()
        protect(agent, w)
        st = status_json(agent)
        assert st["attach"]["mode"] == "tcx" and st["status"] == "ok"
        assert "attach mode:" in agent.cli("status").stdout
        assert programs_on(b.host_ifindex) == {"ingress": ["from_endpoint"], "egress": ["to_endpoint"]}
        links = sorted(os.listdir(os.path.join(agent.settings["bpffs_dir"], "links")))
        assert f"{b.host_ifindex}-ingress" in links and f"{b.host_ifindex}-egress" in links
        with Probe(w["c"], b, b.ip4, 7001) as p:
            time.sleep(0.05)
            t0 = time.monotonic()
            run("tc", "qdisc", "add", "dev", b.host_if, "clsact", check=False)
            run("tc", "filter", "del", "dev", b.host_if, "ingress", check=False)
            run("tc", "filter", "del", "dev", b.host_if, "egress", check=False)
            run("tc", "qdisc", "del", "dev", b.host_if, "clsact", check=False)
            time.sleep(0.5)
        assert p.leaked_after(t0) == 0 and len(p.sent) > 100
        assert programs_on(b.host_ifindex)["egress"] == ["to_endpoint"]
        assert repairs(agent) == 0                       # nothing was ever removed
        ids = {e.prog_id for e in tcx.query(b.host_ifindex, "egress")}
        agent.kill()                                     # kill -9: the pins keep the links
        assert not udp_ok(w["c"], b, b.ip4, 7002)
        assert tcp_ok(w["a"], b, b.ip4, 81)
        agent.start()
        new = tcx.query(b.host_ifindex, "egress")
        assert len(new) == 1 and new[0].prog_id in ids   # the same link and program (same build: not reloaded)
        assert not udp_ok(w["c"], b, b.ip4, 7003) and tcp_ok(w["a"], b, b.ip4, 82)
    finally:
        agent.stop()
    assert programs_on(b.host_ifindex) == {"ingress": [], "egress": []}   # --cleanup


def test_tcx_foreign_program_ahead_is_found_and_ours_goes_first(topo):
    t, w = topo
    b = w["b"]
    from bcc import BPF
    prog = BPF(text=b"int pass_all(struct __sk_buff *skb) { return 0; }")
    fn = prog.load_func(b"pass_all", BPF.SCHED_CLS)
    foreign = None
    with AgentProcess(attach_mode="tcx") as agent:
        protect(agent, w)
        try:
            foreign = tcx.link_create(fn.fd, b.host_ifindex, "egress", first=True)
            t0 = time.monotonic()
            # the repair links ours first, then detaches the old link: wait for both steps
            assert eventually(lambda: programs_on(b.host_ifindex)["egress"] ==
                              ["to_endpoint", "pass_all"], timeout=5, interval=0.02), \
                programs_on(b.host_ifindex)
            took = time.monotonic() - t0
            assert took < 1.0, took
            assert not udp_ok(w["c"], b, b.ip4, 7004)
            st = status_json(agent)
            assert st["status"] == "degraded"
            (d,) = st["attach"]["degraded"]
            assert d["interface"] == b.host_if and "foreign program ahead: pass_all" in d["what"]
            assert repairs(agent) == 1
            assert eventually(lambda: repairs(agent) == 1, timeout=1.5)   # no fight: it stays 1
        finally:
            if foreign is not None:
                os.close(foreign)
            prog.cleanup()


@pytest.mark.parametrize("how", ["filter", "qdisc"])
def test_tc_removal_is_repaired_within_a_second(topo, how):
    t, w = topo
    b = w["b"]
    with AgentProcess(attach_mode="tc") as agent:
        protect(agent, w)
        assert status_json(agent)["attach"]["mode"] == "tc"
        assert programs_on(b.host_ifindex) == {"ingress": ["from_endpoint"], "egress": ["to_endpoint"]}
        with Probe(w["c"], b, b.ip4, 7005) as p:
            time.sleep(0.05)
            if how == "filter":
                run("tc", "filter", "del", "dev", b.host_if, "egress")
            else:
                run("tc", "qdisc", "del", "dev", b.host_if, "clsact")
            t1 = time.monotonic()
            assert eventually(lambda: "to_endpoint" in programs_on(b.host_ifindex)["egress"],
                              timeout=5, interval=0.01)
            time.sleep(0.3)
        hole = p.open_for(t1)
        assert hole < 1.0, hole
        assert not udp_ok(w["c"], b, b.ip4, 7006) and tcp_ok(w["a"], b, b.ip4, 83)
        st = status_json(agent)
        assert st["status"] == "degraded"
        whats = {(d["interface"], d["what"]) for d in st["attach"]["degraded"]}
        assert (b.host_if, "egress: missing") in whats
        assert repairs(agent) >= 1
        assert "stockade.attach" in agent.log() and "restored" in agent.log()


def test_cleanup_removes_links_and_pins(topo):
    t, w = topo
    agent = AgentProcess(attach_mode="tcx")
    try:
        agent.start()
        protect(agent, w)
        agent.kill()
        r = subprocess.run([*STOCKADE, "agent", "--config", str(agent.config_path), "--cleanup"],
                           capture_output=True, text=True, timeout=60, env=agent.environ())
        assert r.returncode == 0, r.stderr
        for n in "abc":
            assert programs_on(w[n].host_ifindex) == {"ingress": [], "egress": []}
        assert not os.path.exists(agent.settings["bpffs_dir"])
    finally:
        agent.stop()


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_cleanup_removes_pins_of_other_sizes(topo, mode):
    """The configuration's map sizes changed since the agent pinned its maps (an operator
    edited agent.yaml, or runs --cleanup with the defaults): --cleanup still detaches
    and removes that pin directory's maps and links, and leaves another agent's alone."""
    t, w = topo
    d = t.add_workload("d", [f"{NET4}4/24"])
    agent = AgentProcess(attach_mode=mode, ct_map_size=16384, endpoints_map_size=64)
    other = AgentProcess(attach_mode=mode)
    try:
        agent.start()
        protect(agent, w)
        other.start()
        other.client.add_endpoint(name="d", interface=d.host_if, ips=d.ips, labels={"app": "d"})
        other_pins = sorted(os.listdir(other.settings["bpffs_dir"]))
        agent.kill()
        agent.settings.update(ct_map_size=32768, endpoints_map_size=128, ipcache_map_size=2048)
        agent.config_path.write_text(yaml.safe_dump(agent.settings))
        r = subprocess.run([*STOCKADE, "agent", "--config", str(agent.config_path), "--cleanup"],
                           capture_output=True, text=True, timeout=60, env=agent.environ())
        assert r.returncode == 0, r.stderr
        assert "detached from 3 interfaces" in r.stdout
        for n in "abc":
            assert programs_on(w[n].host_ifindex) == {"ingress": [], "egress": []}
        assert not os.path.exists(agent.settings["bpffs_dir"])
        assert sorted(os.listdir(other.settings["bpffs_dir"])) == other_pins
        on_d = programs_on(d.host_ifindex)
        assert on_d["ingress"] and on_d["egress"], on_d
        other.client.health()
    finally:
        agent.stop()
        other.stop()


def test_removed_endpoint_never_leaves_its_interface_open(topo):
    """Issue 14.12: a managed interface goes back to unidentified (dropped); an unmanaged
    one gets back what it ran before (here: nothing of ours; a program of another tool
    attached before ours keeps running)."""
    t, w = topo
    from bcc import BPF
    prog = BPF(text=b"int other_tool(struct __sk_buff *skb) { return -1; }")   # TCX_NEXT
    fn = prog.load_func(b"other_tool", BPF.SCHED_CLS)
    other = tcx.link_create(fn.fd, w["c"].host_ifindex, "ingress", first=True)
    try:
        # a: managed (by name); c: unmanaged, named by a static endpoint only
        with AgentProcess(managed_interfaces=[w["a"].host_if]) as agent:
            protect(agent, w)
            assert programs_on(w["c"].host_ifindex)["ingress"] == ["from_endpoint", "other_tool"]
            for n in "ac":
                agent.client.remove_endpoint(n)
            # a: still ours, closed
            assert programs_on(w["a"].host_ifindex)["ingress"] == ["from_endpoint"]
            assert not udp_ok(w["a"], w["b"], w["b"].ip4, 7010)
            assert 'reason="unknown_endpoint"' in agent.client.metrics()
            # c: its original state, the other tool's program alone
            assert programs_on(w["c"].host_ifindex) == {"ingress": ["other_tool"], "egress": []}
            time.sleep(1.0)                     # the guard leaves an interface let go alone
            assert programs_on(w["c"].host_ifindex)["ingress"] == ["other_tool"]
            assert repairs(agent) == 0
    finally:
        os.close(other)
        prog.cleanup()


def test_failed_endpoint_write_is_an_error_and_stays_closed(topo):
    """Issue 14.3: an endpoints map too small for the bridge's ports: every port is
    attached and dropped, the failure is an error in status, never silent."""
    t, w = topo
    extra = t.add_workload("d", [f"{NET4}4/24"])
    with AgentProcess(managed_bridges=[t.bridge], endpoints_map_size=2) as agent:
        h = agent.client.health()
        assert h["status"] == "degraded"
        assert any("endpoint" in e for e in h["errors"]), h["errors"]
        for x in (*w.values(), extra):
            assert programs_on(x.host_ifindex)["ingress"] == ["from_endpoint"], x.host_if
        assert not udp_ok(w["a"], w["b"], w["b"].ip4, 7011)
        assert not udp_ok(extra, w["c"], w["c"].ip4, 7012)
        assert not udp_ok(w["c"], extra, extra.ip4, 7013)


def nft_table_exists(family: str, table: str) -> bool:
    return run("nft", "list", "table", family, table, check=False).returncode == 0


@pytest.mark.parametrize("cover", ["kernel_default_interfaces", "kernel_default_bridge_ports"])
def test_new_workload_is_dropped_while_the_agent_is_stopped(topo, cover):
    """Issue 14.3: the kernel-side default (an nftables table of the agent's own) closes
    a workload that appears while the agent is away, both directions; it stays across
    the agent's kill, a restart keeps it, --cleanup removes it. The bridge's ports are
    covered by name: as interfaces (both tables), or, as the agent does by default where
    nft has no bridge meta (this kernel, Debian 12's cloud kernel), as bridge ports."""
    t, w = topo
    from stockade.datapath.kerneldefault import table_name
    agent = AgentProcess(managed_bridges=[t.bridge], **{cover: [f"{t.prefix}*"]})
    table = table_name(None, agent.settings["bpffs_dir"])
    try:
        agent.start()
        protect(agent, w)
        assert nft_table_exists("bridge", table) and nft_table_exists("inet", table)
        agent.kill()
        late = t.add_workload("d", [f"{NET4}4/24"])     # a new workload, no agent to attach it
        assert programs_on(late.host_ifindex) == {"ingress": [], "egress": []}
        assert not udp_ok(late, w["a"], w["a"].ip4, 7020)
        assert not udp_ok(w["a"], late, late.ip4, 7021)
        assert not tcp_ok(late, w["a"], w["a"].ip4, 84)
        assert tcp_ok(w["a"], w["b"], w["b"].ip4, 85)    # protected ones keep working
        agent.start()                                     # attaches it (closed) and lets it be
        assert programs_on(late.host_ifindex)["ingress"] == ["from_endpoint"]
        agent.client.add_endpoint(name="d", interface=late.host_if, ips=late.ips, labels={"app": "a"})
        assert eventually(lambda: tcp_ok(late, w["b"], w["b"].ip4, 86), timeout=5)
    finally:
        agent.stop()
    assert not nft_table_exists("bridge", table) and not nft_table_exists("inet", table)


def test_failed_attach_is_unprotected_in_status_and_retried(topo):
    """Issue 14.3/14.5: an interface the agent cannot attach to (tc mode, a legacy
    ingress qdisc in clsact's place) is listed as unprotected, live, with an error; once
    the obstacle goes the guard attaches it."""
    t, w = topo
    run("tc", "qdisc", "add", "dev", w["c"].host_if, "ingress")
    with AgentProcess(attach_mode="tc", managed_bridges=[t.bridge]) as agent:
        assert eventually(lambda: w["c"].host_if in agent.client.health()["unprotected_interfaces"],
                          timeout=3), (agent.client.health(), programs_on(w["c"].host_ifindex))
        h = agent.client.health()
        assert h["status"] == "degraded" and h["errors"]
        assert 'stockade_unprotected_interfaces 1.0' in agent.client.metrics()
        run("tc", "qdisc", "del", "dev", w["c"].host_if, "ingress")
        assert eventually(lambda: agent.client.health()["unprotected_interfaces"] == [], timeout=10)
        assert programs_on(w["c"].host_ifindex)["ingress"] == ["from_endpoint"]
        assert not udp_ok(w["c"], w["a"], w["a"].ip4, 7030)      # attached, unidentified: closed
        # while it runs: clsact swapped for an ingress qdisc; not repairable, so reported
        # as unprotected, then repaired once the obstacle goes
        b = w["b"].host_if
        subprocess.run(["tc", "-batch", "-"], input=f"qdisc del dev {b} clsact\n"
                       f"qdisc add dev {b} ingress\n", text=True, check=True, timeout=10)
        assert eventually(lambda: b in agent.client.health()["unprotected_interfaces"], timeout=5)
        whats = [d["what"] for d in agent.client.health()["attach"]["degraded"] if d["interface"] == b]
        assert any("not repaired" in x for x in whats), whats
        run("tc", "qdisc", "del", "dev", b, "ingress", check=False)
        assert eventually(lambda: agent.client.health()["unprotected_interfaces"] == [], timeout=10)
        assert programs_on(w["b"].host_ifindex) == {"ingress": ["from_endpoint"], "egress": ["to_endpoint"]}
