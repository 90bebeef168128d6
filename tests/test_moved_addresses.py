"""Which conntrack entries an ipcache change cuts (issue 14.7): addresses whose identity
changes, found by longest prefix over the model, and the raw-byte prefix match of the
conntrack walk."""
import ipaddress

from stockade.daemon.state import IpcacheEntry
from stockade.daemon.txn import WORLD_ID, resolution_changed
from stockade.datapath.conntrack import _by_length


def raw(addr: str) -> tuple[int, bytes]:
    a = ipaddress.ip_address(addr)
    return a.version, a.packed


def test_an_address_gaining_an_entry_leaves_world():
    after = {"10.0.0.5/32": IpcacheEntry(300, "remote", None)}
    changed = resolution_changed(after, {"10.0.0.5/32": None})
    assert changed(*raw("10.0.0.5"))


def test_an_address_losing_its_entry_goes_back_to_world():
    changed = resolution_changed({}, {"10.0.0.5/32": 300})
    assert changed(*raw("10.0.0.5"))


def test_a_shorter_prefix_was_what_it_resolved_to():
    after = {"10.0.0.0/8": IpcacheEntry(400, "cidr", None),
             "10.0.0.5/32": IpcacheEntry(400, "remote", None)}
    assert not resolution_changed(after, {"10.0.0.5/32": None})(*raw("10.0.0.5"))
    after["10.0.0.5/32"] = IpcacheEntry(401, "remote", None)
    assert resolution_changed(after, {"10.0.0.5/32": None})(*raw("10.0.0.5"))


def test_a_more_specific_entry_keeps_its_addresses():
    """A CIDR entry added over endpoints' host entries moves only the other addresses."""
    after = {"10.0.0.0/8": IpcacheEntry(400, "cidr", None),
             "10.0.0.5/32": IpcacheEntry(300, "local", None)}
    changed = resolution_changed(after, {"10.0.0.0/8": None})
    assert not changed(*raw("10.0.0.5"))
    assert changed(*raw("10.9.9.9"))


def test_a_prefix_changed_and_changed_back_in_one_change_moves_nothing():
    after = {"fd00::5/128": IpcacheEntry(300, "remote", None)}
    assert not resolution_changed(after, {"fd00::5/128": 300})(*raw("fd00::5"))
    assert WORLD_ID == 2


def test_ipv6_longest_prefix():
    after = {"fd00::/64": IpcacheEntry(500, "cidr", None)}
    changed = resolution_changed(after, {"fd00::/64": 501})
    assert changed(*raw("fd00::1234"))


def test_by_length_matches_addresses_by_their_bytes():
    nets = _by_length(["10.0.0.0/8", "10.1.2.3/32", "fd00::/64", "192.168.1.77/24"])

    def inside(addr: str) -> bool:
        family, b = raw(addr)
        a = int.from_bytes(b, "big")
        return any(a >> shift in within for shift, within in nets.get(family, []))
    assert inside("10.200.0.1") and inside("10.1.2.3") and inside("192.168.1.1")
    assert inside("fd00::ffff") and not inside("fd00:0:0:1::1")
    assert not inside("11.0.0.1") and not inside("192.168.2.1")
