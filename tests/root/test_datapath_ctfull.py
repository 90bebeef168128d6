"""Conntrack capacity: a full table and spent budgets fail closed for new flows only,
counted as ct_full; one workload cannot take another's place (issue 14 item 7).

Own program builds (tiny CT_MAX / CT_ENDPOINT_MAX), own pins and own topology:
A, B and C are endpoints (identities 1001-1003) on one bridge.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

import traffic
from dpenv import ID_A, ID_B, ID_C, datapath_env
from stockade.datapath import Datapath, DatapathError, Reason, Verdict
from stockade.datapath.maps import DIR_EGRESS, DIR_INGRESS
from stockade.policy.mapstate import EGRESS, INGRESS, PROTO_UDP, DirectionPolicy, Entry, Key

pytestmark = pytest.mark.root

PIN = f"/sys/fs/bpf/stockade-test-{os.getpid()}-ct"
FULL = {"STOCKADE_PIN_DIR": PIN, "CT_MAX": 4}
BUDGET = {"STOCKADE_PIN_DIR": PIN + "b", "CT_MAX": 256, "CT_ENDPOINT_MAX": 3,
          "CT_PRESSURE_PCT": 0}      # budgets always enforced
PRESSURE = {"STOCKADE_PIN_DIR": PIN + "p", "CT_MAX": 16, "CT_ENDPOINT_MAX": 2,
            "CT_PRESSURE_PCT": 50}   # budgets enforced from 8 entries on
ADDRS = {"a": ["10.213.8.1/24"], "b": ["10.213.8.2/24"], "c": ["10.213.8.3/24"]}
DEFAULT_DENY = DirectionPolicy(enforced=True, default_deny=True)


@pytest.fixture(scope="module")
def small_ct():
    with datapath_env(FULL, ADDRS, tag="f") as env:
        env.reset()
        yield env


@pytest.fixture(scope="module")
def budgets():
    with datapath_env(BUDGET, ADDRS, tag="g") as env:
        env.endpoints = {"a": ID_A, "b": ID_B, "c": ID_C}
        yield env


@pytest.fixture
def bud(budgets):
    budgets.reset()
    yield budgets
    budgets.reset()


def send_udp(a, b, sport: int, dport: int = 5353) -> bool:
    srv = b.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        srv.bind((b.ip4, dport))
        srv.settimeout(0.5)
        cli.bind((a.ip4, sport))
        cli.sendto(b"x", (b.ip4, dport))
        try:
            return srv.recv(16) == b"x"
        except OSError:
            return False
    finally:
        srv.close()
        cli.close()


class Stream:
    """A UDP flow A -> B whose replies must keep passing A's default-deny ingress."""

    def __init__(self, a, b, sport):
        self.srv = b.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.cli = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.srv.bind((b.ip4, 6000))
        self.cli.bind((a.ip4, sport))
        for s in (self.srv, self.cli):
            s.settimeout(0.5)
        self.cli.sendto(b"open", (b.ip4, 6000))
        _, self.peer = self.srv.recvfrom(16)

    def reply_passes(self) -> bool:
        self.srv.sendto(b"r", self.peer)
        try:
            return self.cli.recv(16) == b"r"
        except OSError:
            return False

    def close(self):
        self.srv.close()
        self.cli.close()


def test_new_flow_dropped_when_conntrack_full(small_ct):
    dp, a, b = small_ct.dp, small_ct.a, small_ct.b
    assert send_udp(a, b, 40001) and send_udp(a, b, 40002)   # 2 flows x 2 hooks = full
    assert len(dp.ct_entries()) == 4
    assert not send_udp(a, b, 40003)
    assert dp.counters()[(DIR_EGRESS, Verdict.DROPPED, Reason.CT_FULL)][0] == 1
    assert send_udp(a, b, 40001)                              # tracked flows still pass
    assert dp.ct_gc(now_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 120 * 10**9) == 4
    assert dp.ct_budgets() == {}                              # all charged back, pruned
    assert send_udp(a, b, 40003)


def test_flood_fills_only_the_flooders_budget(bud):
    """A opens flows until its egress budget (3) is spent: its next new flow is
    ct_full, its tracked flows and other workloads' new flows are not affected."""
    bud.policy({}, {(ID_A, INGRESS): DEFAULT_DENY})
    a, b, c = bud.a, bud.b, bud.c
    stream = Stream(a, b, 41000)
    try:
        for port in (41001, 41002):
            assert send_udp(a, b, port)
        assert not send_udp(a, b, 41003)                      # budget of 3: the stream + 2
        assert bud.count(EGRESS, Verdict.DROPPED, Reason.CT_FULL) == 1
        assert stream.reply_passes()
        assert send_udp(c, b, 41004) and send_udp(b, c, 41005)
        assert bud.dp.ct_budgets()[(a.host_ifindex, DIR_EGRESS, 0)] == 3
    finally:
        stream.close()


def test_peer_flood_does_not_close_an_endpoint_to_others(bud):
    """Flows toward B are charged per peer: A filling its budget at B's ingress leaves
    C's new flows to B alone (B's ingress allows both: policy is not the limit)."""
    bud.policy({Key(ID_B, ID_A, INGRESS, PROTO_UDP): Entry(False),
                Key(ID_B, ID_C, INGRESS, PROTO_UDP): Entry(False)},
               {(ID_B, INGRESS): DEFAULT_DENY})
    a, b, c = bud.a, bud.b, bud.c
    budgets = bud.dp.ct_budgets
    for port in (42001, 42002, 42003):
        assert send_udp(a, b, port)
    assert budgets()[(b.host_ifindex, DIR_INGRESS, ID_A)] == 3
    assert budgets()[(a.host_ifindex, DIR_EGRESS, 0)] == 3
    bud.dp.ct_delete([k for k, _ in bud.dp.ct_entries()
                      if k.ifindex == a.host_ifindex])       # room again at A's own egress
    assert not send_udp(a, b, 42004)                          # refused at B's ingress
    assert bud.count(INGRESS, Verdict.DROPPED, Reason.CT_FULL) == 1
    assert send_udp(c, b, 42005)
    assert budgets()[(b.host_ifindex, DIR_INGRESS, ID_C)] == 1


def test_budget_counts_match_entries(bud):
    """created - released per owner equals the entries the map holds, through
    creation, gc of expired entries and deletion by identity pair."""
    a, b, c = bud.a, bud.b, bud.c
    for w, port in ((a, 43001), (a, 43002), (c, 43003)):
        assert send_udp(w, b, port)

    def by_owner():
        out = {}
        for k, v in bud.dp.ct_entries():
            o = (k.ifindex, k.direction, v.owner_peer)
            out[o] = out.get(o, 0) + 1
        return out

    assert by_owner() == bud.dp.ct_budgets()
    assert bud.dp.ct_delete_pairs({(ID_B, ID_A)}) == 2       # B's ingress entries from A
    assert by_owner() == {o: n for o, n in bud.dp.ct_budgets().items() if n}
    assert not any(k.ifindex == b.host_ifindex and v.owner_peer == ID_A
                   for k, v in bud.dp.ct_entries())
    far = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 120 * 10**9
    assert bud.dp.ct_gc(now_ns=far) == 4
    assert bud.dp.ct_budgets() == {}


def test_deleted_pair_is_judged_again(bud):
    """A policy change revokes A -> B: the tracked flow keeps passing until
    ct_delete_pairs removes its entries, then its next packet is judged (dropped)."""
    bud.policy({Key(ID_A, ID_B, EGRESS, PROTO_UDP, 6000, 16): Entry(False)},
               {(ID_A, EGRESS): DEFAULT_DENY, (ID_A, INGRESS): DEFAULT_DENY})
    a, b = bud.a, bud.b
    stream = Stream(a, b, 44000)
    try:
        assert stream.reply_passes()
        bud.policy({}, {(ID_A, EGRESS): DEFAULT_DENY, (ID_A, INGRESS): DEFAULT_DENY})
        assert stream.reply_passes()                          # tracked: still passes
        assert bud.dp.ct_delete_pairs({(ID_A, ID_B)}) >= 1
        assert not stream.reply_passes()                      # judged again: dropped
        assert traffic.eventually(
            lambda: bud.count(INGRESS, Verdict.DROPPED, Reason.POLICY_DENIED) >= 1)
    finally:
        stream.close()


def test_budget_applies_under_pressure_only():
    """Past its budget (2), A may still open flows while the table holds fewer than 8
    entries; then A's new flows are refused and C's (within its budget) are not."""
    with datapath_env(PRESSURE, ADDRS, tag="q") as env:
        env.endpoints = {"a": ID_A, "b": ID_B, "c": ID_C}
        env.reset()
        a, b, c = env.a, env.b, env.c
        for port in (45001, 45002, 45003, 45004):    # 2 entries each: A's egress, B's ingress
            assert send_udp(a, b, port)
        assert env.dp.ct_budgets(table=True)[(0, 0, 0)] == 8
        assert not send_udp(a, b, 45005)
        assert env.count(EGRESS, Verdict.DROPPED, Reason.CT_FULL) == 1
        assert send_udp(c, b, 45006)
        assert env.dp.ct_budgets()[(a.host_ifindex, DIR_EGRESS, 0)] == 4


def test_pin_with_other_geometry_is_refused(small_ct):
    """A restarted agent built with another CT_MAX must not run on the old pin."""
    with pytest.raises(DatapathError, match=r"conntrack_v2: pinned map has .* \(44, 24, 4\), "
                                            r"this build needs \(44, 24, 8\)"):
        Datapath({**FULL, "CT_MAX": 8})
    assert small_ct.dp.max_entries("conntrack") == 4


def test_settings_errors_are_datapath_errors():
    with pytest.raises(DatapathError, match="settings: unknown keys"):
        Datapath({"NO_SUCH_SETTING": 1})
    with pytest.raises(DatapathError, match="cannot compile or load"):
        Datapath({**FULL, "CT_TIMEOUT_SYN_S": "not a number"})
