"""Migration of the previous build's pins (stockade.datapath.migrate), map by map.

The previous build (tests/oldbuild.py, from git history) writes its
v1 maps in a child process with its own PYTHONPATH; this build then opens the same pin
directory. The agent-level upgrade with live traffic is test_datapath_upgrade.py.
"""
from __future__ import annotations

import ctypes as ct
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from netns import Topology
from oldbuild import old_build
from stockade.datapath import Datapath, DatapathError, Reason, Verdict, pin_name
from stockade.datapath import maps as m
from stockade.datapath.writer import _gen_of
from stockade.policy.mapstate import EGRESS, DirectionPolicy, Key

pytestmark = pytest.mark.root

PIN = f"/sys/fs/bpf/stockade-test-{os.getpid()}-mig"
SETTINGS = {"STOCKADE_PIN_DIR": PIN, "CT_MAX": 1024}
FAR = 10**12

OLD_WRITER = textwrap.dedent("""
    import ctypes as ct, socket, sys, time
    from stockade.datapath import Datapath
    from stockade.datapath import maps as m
    pin, ifindex, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dp = Datapath({"STOCKADE_PIN_DIR": pin, "CT_MAX": 1024})
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    def ct_entry(proto, direction, src, dst, sport, dport, expires):
        k = m.CtKey(ifindex=ifindex, proto=proto, direction=direction, family=4,
                    sport=socket.htons(sport), dport=socket.htons(dport))
        ct.memmove(k.saddr, socket.inet_aton(src), 4)
        ct.memmove(k.daddr, socket.inet_aton(dst), 4)
        dp._update("conntrack", k, m.CtValue(expires=expires, created=now, state=1))

    if what == "initial":
        dp.set_endpoint(ifindex, 1, 1001, ["10.213.40.1"], mac="02:00:00:00:00:01")
        dp.set_ipcache("10.213.40.9", 1009)
        ct_entry(1, 0, "10.213.40.9", "10.213.40.1", 7, 7, now + %(far)d)     # echo in
        ct_entry(6, 1, "10.213.40.1", "10.213.40.9", 40000, 80, now + %(far)d)  # tcp out
        ct_entry(17, 1, "10.213.40.1", "10.213.40.9", 40001, 53, now - 1)   # expired
        # policy v1: egress of 1001 default-deny, allow 1009 tcp/80, deny any udp
        dp._update("policy", m.PolicyKey(prefixlen=96, local=1001, peer=1009, direction=1,
                                         proto=6, port=socket.htons(80)), m.PolicyValue(deny=0))
        dp._update("policy", m.PolicyKey(prefixlen=80, local=1001, peer=0, direction=1,
                                         proto=17), m.PolicyValue(deny=1))
        dp._update("policy_flags", m.PolicyFlagsKey(identity=1001, direction=1),
                   m.PolicyFlagsValue(enforced=1, default_deny=1))
        t = dp.table("counters")
        idx = (1 * 3 + 0) * 11 + 10      # egress, forwarded, neigh in v1's numbering
        leaf = t.Leaf()                  # one value per CPU
        leaf[0].packets, leaf[0].bytes = 5, 500
        t[t.Key(idx)] = leaf
    else:                                # a flow opened while both builds ran
        ct_entry(17, 1, "10.213.40.1", "10.213.40.9", 40002, 53, now + %(far)d)
    dp.close()
""") % {"far": FAR}


def run_old(old_tree, ifindex: int, what: str) -> None:
    r = subprocess.run([sys.executable, "-c", OLD_WRITER, PIN, str(ifindex), what],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": f"{old_tree}/agent"})
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture
def link():
    with Topology("m") as topo:
        yield topo.add_workload("a", ["10.213.40.1/24"]), topo


@pytest.fixture(scope="module")
def old_tree():
    with old_build() as tree:
        yield tree


def test_v1_pins_are_migrated(old_tree, link):
    w, topo = link
    dp = None
    try:
        run_old(old_tree, w.host_ifindex, "initial")
        assert os.path.exists(f"{PIN}/conntrack") and os.path.exists(f"{PIN}/endpoints")
        dp = Datapath(SETTINGS)
        names = set(os.listdir(PIN))
        assert {"conntrack", "endpoints", "counters", "policy", "policy_flags"}.isdisjoint(names)
        assert {pin_name("conntrack"), pin_name("endpoints"), pin_name("counters"),
                pin_name("policy"), pin_name("policy_flags")} <= names
        # policy v1 -> v2: the same entries, generation 0, in force
        assert dp.policy_flags() == {(1001, EGRESS): DirectionPolicy(True, True)}
        assert {k: e.deny for k, e in dp.policy_entries().items()} == {
            Key(1001, 1009, EGRESS, 6, 80, 16): False, Key(1001, 0, EGRESS, 17): True}
        assert {_gen_of(k) for k, _ in dp._items("policy", m.PolicyKey, m.PolicyValue)} == {0}

        ep = dp.get_endpoint(w.host_ifindex)
        assert (ep.identity, ep.n_ip4, ep.n_ll) == (1001, 1, 1)
        assert bytes(ep.ll[0].w) == socket.inet_pton(socket.AF_INET6, "fe80::ff:fe00:1")
        assert ep.host_ifindex == socket.if_nametoindex(topo.bridge)

        entries = {(k.proto, k.direction): (k, v) for k, v in dp.ct_entries()}
        assert set(entries) == {(1, 0), (6, 1)}               # the expired one stayed behind
        echo, val = entries[(1, 0)]
        assert (echo.icmp_type, socket.ntohs(echo.sport), echo.dport) == (8, 7, 0)
        assert val.owner_peer == 1009                          # charged to the peer
        assert dp.ct_budgets(table=True) == {(w.host_ifindex, 0, 1009): 1,
                                             (w.host_ifindex, 1, 0): 1, (0, 0, 0): 2}
        assert dp.counters()[(1, Verdict.FORWARDED, Reason.NEIGH)] == (5, 500)

        # the previous build's programs are still attached somewhere: what they write
        # now lands in the old (unpinned, still open) map and is copied by finish_upgrade
        k = m.CtKeyV1(ifindex=w.host_ifindex, proto=17, direction=1, family=4,
                      sport=socket.htons(40002), dport=socket.htons(53))
        ct.memmove(k.saddr, socket.inet_aton("10.213.40.1"), 4)
        ct.memmove(k.daddr, socket.inet_aton("10.213.40.9"), 4)
        v = m.CtValue(expires=time.clock_gettime_ns(time.CLOCK_MONOTONIC) + FAR)
        from bcc.libbcc import lib
        assert lib.bpf_update_elem(dp._legacy["conntrack"], ct.byref(k), ct.byref(v), 0) == 0
        assert dp.finish_upgrade() == {"conntrack": 1}
        assert dp._legacy == {} and dp.finish_upgrade() == {}
        assert (17, 1) in {(k.proto, k.direction) for k, _ in dp.ct_entries()}
        assert dp.ct_budgets()[(w.host_ifindex, 1, 0)] == 2
    finally:
        if dp is not None:
            dp.remove_pins()
            dp.close()
        subprocess.run(["rm", "-rf", PIN], check=False)


def test_second_start_finds_nothing_to_migrate(link):
    w, _ = link
    dp = Datapath(SETTINGS)
    try:
        assert dp._legacy == {}
        dp.close()
        dp = Datapath(SETTINGS)
        assert dp._legacy == {} and dp.finish_upgrade() == {}
    finally:
        dp.remove_pins()
        dp.close()


def test_pins_of_a_newer_build_are_refused(link):
    dp = Datapath(SETTINGS)
    newer = f"{PIN}/conntrack_v9"
    try:
        from bcc.libbcc import lib
        lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        assert lib.bpf_obj_pin(dp.table("config").map_fd, newer.encode()) == 0
        with pytest.raises(DatapathError, match=r"conntrack_v9: pinned by a newer build "
                                                r"\(layout v9; this build knows v2\)"):
            Datapath(SETTINGS)
    finally:
        if os.path.exists(newer):
            os.unlink(newer)
        dp.remove_pins()
        dp.close()


def test_legacy_pin_of_unknown_geometry_is_refused(link):
    """A v1 name whose sizes are not v1's (a hand-made or foreign pin): refuse."""
    dp = Datapath(SETTINGS)
    bogus = f"{PIN}/conntrack"
    try:
        from bcc.libbcc import lib
        lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        assert lib.bpf_obj_pin(dp.table("config").map_fd, bogus.encode()) == 0
        with pytest.raises(DatapathError, match=r"conntrack: layout v1 pin has key/value sizes "
                                                r"\(4, 4\), expected \(44, 24\)"):
            Datapath(SETTINGS)
    finally:
        if os.path.exists(bogus):
            os.unlink(bogus)
        dp.remove_pins()
        dp.close()
