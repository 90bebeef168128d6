"""A non-LRU conntrack map that fills up: new flows drop with ct_full until gc.

Own program build (CT_MAP_TYPE "hash", CT_MAX 4), own pins and own topology.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

from netns import Topology  # tests/ is on sys.path (tests/conftest.py)

from stockade.datapath import Datapath, DatapathError, Reason, Verdict, attach
from stockade.datapath.maps import DIR_EGRESS

pytestmark = pytest.mark.root

SETTINGS = {"STOCKADE_PIN_DIR": f"/sys/fs/bpf/stockade-test-{os.getpid()}-ct",
            "CT_MAP_TYPE": "hash", "CT_MAX": 4}


@pytest.fixture(scope="module")
def small_ct():
    dp = None
    with Topology("f") as topo:
        try:
            a = topo.add_workload("a", ["10.213.8.1/24"])
            b = topo.add_workload("b", ["10.213.8.2/24"])
            dp = Datapath(SETTINGS)
            dp.flush()
            for i, w in enumerate((a, b)):
                attach(w.host_ifindex, dp.from_endpoint_fd, dp.to_endpoint_fd)
                dp.set_endpoint(w.host_ifindex, i + 1, 1001 + i, w.ips)
            yield dp, a, b
        finally:
            if dp is not None:
                dp.cleanup(extra_ifindexes=[w.host_ifindex for w in topo.workloads.values()])
                dp.close()


def send_udp(a, b, sport: int) -> bool:
    srv = b.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        srv.bind((b.ip4, 5353))
        srv.settimeout(0.5)
        cli.bind((a.ip4, sport))
        cli.sendto(b"x", (b.ip4, 5353))
        try:
            return srv.recv(16) == b"x"
        except OSError:
            return False
    finally:
        srv.close()
        cli.close()


def test_new_flow_dropped_when_conntrack_full(small_ct):
    dp, a, b = small_ct
    assert send_udp(a, b, 40001) and send_udp(a, b, 40002)   # 2 flows x 2 hooks = full
    assert len(dp.ct_entries()) == 4
    assert not send_udp(a, b, 40003)
    assert dp.counters()[(DIR_EGRESS, Verdict.DROPPED, Reason.CT_FULL)][0] == 1
    assert dp.ct_gc(now_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 120 * 10**9) == 4
    assert send_udp(a, b, 40003)


def test_pin_with_other_geometry_is_refused(small_ct):
    """A restarted agent built with another CT_MAX must not run on the old pin."""
    with pytest.raises(DatapathError, match=r"conntrack: pinned map has .* \(44, 24, 4\), "
                                            r"this build needs \(44, 24, 8\)"):
        Datapath({**SETTINGS, "CT_MAX": 8})
    assert small_ct[0].max_entries("conntrack") == 4


def test_settings_errors_are_datapath_errors():
    with pytest.raises(DatapathError, match="settings: unknown keys"):
        Datapath({"NO_SUCH_SETTING": 1})
    with pytest.raises(DatapathError, match="cannot compile or load"):
        Datapath({**SETTINGS, "CT_MAP_TYPE": "no_such_type"})
