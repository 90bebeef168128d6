"""Flow events from the real program: one per new connection and per drop, rate limited
per CPU with separate budgets, exact counters, lost events counted, policy match.

A small build (drop budget 20/s, burst 10) on its own pins; workloads a (1001) and
b (1002) as endpoints, maps written directly from stockade.policy.mapstate types.
"""
from __future__ import annotations

import os
import socket

import pytest

from netns import Topology
from stockade.datapath import Datapath, Reason, Verdict, attach, detach
from stockade.datapath import maps as m
from stockade.flows import EVENT, Decoder, FlowRing
from stockade.policy.mapstate import EGRESS, INGRESS, PROTO_TCP, PROTO_UDP, DirectionPolicy, Entry, Key, diff
from traffic import tcp_ok

pytestmark = pytest.mark.root

ID_A, ID_B = 1001, 1002
DROP_BURST = 10
SETTINGS = {"STOCKADE_PIN_DIR": f"/sys/fs/bpf/stockade-test-flows-{os.getpid()}",
            "CT_MAX": 4096, "EVENTS_DROP_RATE": 20, "EVENTS_DROP_BURST": DROP_BURST,
            "EVENTS_NEW_RATE": 1000, "EVENTS_NEW_BURST": 100}
DEFAULT_DENY = DirectionPolicy(enforced=True, default_deny=True)


@pytest.fixture(scope="module")
def env():
    topo = Topology("d")
    dp = None
    try:
        topo.__enter__()
        a = topo.add_workload("a", ["10.213.42.1/24"])
        b = topo.add_workload("b", ["10.213.42.2/24"])
        dp = Datapath(SETTINGS)
        for w in (a, b):
            attach(w.host_ifindex, dp.from_endpoint_fd, dp.to_endpoint_fd)
        dp.set_endpoint(a.host_ifindex, 1, ID_A, a.ips, mac=a.mac)
        dp.set_endpoint(b.host_ifindex, 2, ID_B, b.ips, mac=b.mac)
        dp.set_ipcache(a.ip4, ID_A)
        dp.set_ipcache(b.ip4, ID_B)
        events: list[bytes] = []
        dp.open_events(events.append, raw=True)
        yield dp, a, b, events
    finally:
        for w in topo.workloads.values():
            detach(w.host_ifindex)
        topo.close()
        if dp is not None:
            dp.cleanup()
            dp.close()


def drain(dp, events) -> list[tuple]:
    dp.poll_events(50)
    rows = list(EVENT.iter_unpack(b"".join(events)))
    events.clear()
    return rows


def set_policy(dp, entries, flags):
    dp.apply_delta(diff(dp.policy_entries(), entries, dp.policy_flags(), flags))


def test_event_layout_matches_struct():
    import ctypes
    assert EVENT.size == ctypes.sizeof(m.FlowEvent)


def test_established_packets_make_no_events_and_match_is_reported(env):
    dp, a, b, events = env
    key = Key(ID_B, ID_A, INGRESS, PROTO_TCP, 7000, 16)
    set_policy(dp, {key: Entry(deny=False, policies=frozenset({"p"}))}, {(ID_B, INGRESS): DEFAULT_DENY})
    drain(dp, events)
    assert tcp_ok(a, b, b.ip4, 7000)
    rows = drain(dp, events)
    tcp = [r for r in rows if r[12] == PROTO_TCP]
    # one SYN event per hook; the handshake's rest and the data are established
    assert sorted(r[4] for r in tcp) == [INGRESS, EGRESS]
    ingress = next(r for r in tcp if r[4] == INGRESS)
    assert ingress[5] == Verdict.FORWARDED and ingress[13] & 0x02  # SYN
    assert ingress[17] & 0x0F == m.MATCH_ALLOW and ingress[17] & m.MATCH_F_EXACT
    egress = next(r for r in tcp if r[4] == EGRESS)
    assert egress[17] == m.MATCH_NOT_ENFORCED
    assert ingress[16] > 0  # packet length


def test_drop_events_rate_limited_counters_exact_new_budget_separate(env):
    dp, a, b, events = env
    set_policy(dp, {Key(ID_B, ID_A, INGRESS, PROTO_TCP, 7000, 16): Entry(deny=False)},
               {(ID_B, INGRESS): DEFAULT_DENY})
    drain(dp, events)
    before = dp.counters().get((INGRESS, Verdict.DROPPED, Reason.POLICY_DENIED), (0, 0))[0]
    lost_before = dp.events_lost()
    n = 2000
    s = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(n):
            s.sendto(b"x", (b.ip4, 9000 + i % 50))
    finally:
        s.close()
    assert tcp_ok(a, b, b.ip4, 7000)   # a new connection right after the flood
    rows = drain(dp, events)
    after = dp.counters()[(INGRESS, Verdict.DROPPED, Reason.POLICY_DENIED)][0]
    assert after - before == n, "counters are exact whatever the event budget"
    drops = [r for r in rows if r[5] == Verdict.DROPPED and r[12] == PROTO_UDP]
    ncpu = os.cpu_count() or 1
    assert 1 <= len(drops) <= (DROP_BURST + 5) * ncpu
    lost = dp.events_lost()
    assert lost["rate_limit_drop"] - lost_before["rate_limit_drop"] == n - len(drops)
    assert lost["ringbuf_full"] == lost_before["ringbuf_full"]
    new = [r for r in rows if r[12] == PROTO_TCP and r[5] == Verdict.FORWARDED]
    assert {r[4] for r in new} == {INGRESS, EGRESS}, "drops must not use up the verdict budget"
    # decoded rows carry the same facts
    ring = FlowRing(64)
    Decoder(ring).decode_into_ring([EVENT.pack(*r) for r in drops[:3]])
    f = ring.to_dict(ring.rows()[0])
    assert f["verdict"] == "DROPPED" and f["drop_reason"] == "policy_denied"
    assert f["policy_match"] == "default-deny" and f["direction"] == "ingress"


def test_events_carry_what_decided_them_at_the_time(env):
    """The policy map's value holds a number for the policies behind the entry; the event
    carries the numbers of the entries that matched, so decoding after a policy change
    still names the policy that decided the packet (issue 13: attribution at the time)."""
    from stockade.flows import Resolver
    dp, a, b, events = env
    key = Key(ID_B, ID_A, INGRESS, PROTO_TCP, 7001, 16)
    set_policy(dp, {key: Entry(deny=False, policies=frozenset({"old-policy"}))},
               {(ID_B, INGRESS): DEFAULT_DENY})
    dp.poll_events(50)
    events.clear()
    assert tcp_ok(a, b, b.ip4, 7001)
    dp.poll_events(50)
    raw = list(events)
    events.clear()
    # the policy changes before anyone decodes the event
    set_policy(dp, {key: Entry(deny=False, policies=frozenset({"new-policy"}))},
               {(ID_B, INGRESS): DEFAULT_DENY})
    ring = FlowRing(64)
    dec = Decoder(ring, Resolver(policies=dp.policy_names))
    rows = [r for r in dec.rows(raw) if r[16] == PROTO_TCP and r[14] == INGRESS]
    assert rows, "no event for the connection"
    assert ring.to_dict(rows[0])["policy"] == ["old-policy"]
    assert tcp_ok(a, b, b.ip4, 7001)
    dp.poll_events(50)
    new = [r for r in dec.rows(list(events)) if r[16] == PROTO_TCP and r[14] == INGRESS]
    events.clear()
    assert new and ring.to_dict(new[0])["policy"] == ["new-policy"]
    # the raw event holds the entry's number, the same the map's value holds
    ev = EVENT.unpack(next(e for e in raw if EVENT.unpack(e)[12] == PROTO_TCP and EVENT.unpack(e)[4] == INGRESS))
    assert ev[-2] == dp.policy_id(Entry(deny=False, policies=frozenset({"old-policy"}))) and ev[-1] == 0
