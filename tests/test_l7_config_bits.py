"""The config map's L7 "none" bits (CFG_F_L7_NO_SERVERS, CFG_F_L7_NO_CLIENTS), which
let the programs skip the l7_ports lookups, checked after every single map write of
sync_l7 against a fake map layer (no kernel): a kind with an entry in l7_ports never
has its bit set. tests/root/test_l7_none_bits.py checks the real maps and traffic."""
from __future__ import annotations

import itertools

import pytest

from recording_maps import RawMapWriter
from stockade.datapath import maps as m
from stockade.datapath.errors import DatapathError
from stockade.datapath.l7maps import L7Maps, _port_key

pytestmark = pytest.mark.pure

BIT = {m.L7_SERVER: m.CFG_F_L7_NO_SERVERS, m.L7_CLIENT: m.CFG_F_L7_NO_CLIENTS}
HOSTS = {7: (3, b"\x02\x00\x00\x00\x00\x01")}


class FakeL7(RawMapWriter, L7Maps):
    def __init__(self):
        super().__init__()
        self.maps.update({"config": {}, "l7_ports": {}, "l7_host": {}})
        self.limits.update({"config": 1, "l7_ports": 64, "l7_host": 64})

    def config_flags(self):
        raw = self.maps["config"].get(bytes(m.ct.c_uint32(0)))
        return m.ConfigValue.from_buffer_copy(raw).flags if raw else 0

    def after_write(self):
        flags = self.config_flags()
        for kind in {key[2] for key in self.l7_ports()}:
            assert not flags & BIT[kind], f"write {self.writes}: kind {kind} skipped with entries"


STATES = {
    "none": {},
    "server": {("10.0.0.2", 8080, m.L7_SERVER): 1002},
    "client": {("10.0.0.1", 8080, m.L7_CLIENT): 1001, ("fd00::1", 80, m.L7_CLIENT): 1001},
    "both": {("10.0.0.2", 8080, m.L7_SERVER): 1002, ("10.0.0.1", 9090, m.L7_CLIENT): 1001},
}


@pytest.mark.parametrize("old,new", list(itertools.permutations(STATES, 2)),
                         ids=[f"{o}->{n}" for o, n in itertools.permutations(STATES, 2)])
def test_bits_cleared_before_the_first_entry_set_after_the_last(old, new):
    w = FakeL7()
    w.sync_l7(STATES[old], HOSTS if STATES[old] else {})
    w.sync_l7(STATES[new], HOSTS if STATES[new] else {})
    kinds = {kind for _, _, kind in STATES[new]}
    assert w.l7_ports() == STATES[new]
    assert w.config_flags() & m.CFG_L7_BITS == sum(BIT[k] for k in BIT if k not in kinds)


def test_a_failed_write_leaves_the_lookups_on():
    w = FakeL7()
    w.sync_l7(STATES["both"], HOSTS)
    for fail_at in range(w.writes, w.writes + 4):
        w.fail_at = fail_at
        with pytest.raises(DatapathError):
            w.sync_l7({}, {})
        w.fail_at = None
    # each write that failed left every remaining kind looked up (after_write held)
    w.sync_l7({}, {})
    assert w.config_flags() & m.CFG_L7_BITS == m.CFG_L7_BITS


def test_set_config_keeps_the_l7_bits():
    w = FakeL7()
    w.sync_l7(STATES["server"], HOSTS)
    w.set_config(audit=True)
    assert w.config_flags() == m.CFG_F_AUDIT | m.CFG_F_L7_NO_CLIENTS
    w.set_config()
    assert w.config_flags() == m.CFG_F_L7_NO_CLIENTS


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("stale", [0, m.CFG_F_L7_NO_SERVERS, m.CFG_F_L7_NO_CLIENTS, m.CFG_L7_BITS])
def test_start_aligns_stale_bits_with_the_entries(state, stale):
    """Pinned maps with entries and whatever bits were left (the agent's start calls
    align_l7_bits): afterwards a kind with entries is looked up, one without skipped;
    the other flags stay."""
    w = FakeL7()
    for key, ident in STATES[state].items():
        w.maps["l7_ports"][bytes(_port_key(*key))] = bytes(m.L7PortValue(ident))
    w.maps["config"][bytes(m.ct.c_uint32(0))] = bytes(m.ConfigValue(flags=stale | m.CFG_F_AUDIT))
    w.align_l7_bits()
    kinds = {kind for _, _, kind in STATES[state]}
    assert w.config_flags() == m.CFG_F_AUDIT | sum(BIT[k] for k in BIT if k not in kinds)
