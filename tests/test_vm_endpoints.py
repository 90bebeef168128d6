"""VM endpoints without root: the tap/MAC rule, the static spec by MAC, and the libvirt
metadata format."""
import pytest

from stockade.daemon.endpoints import Endpoint, parse_spec, tap_matches_mac
from stockade.discovery.libvirt import domain_interfaces, parse_metadata
from stockade.errors import InvalidRequest
from stockade.policy.labels import LabelSet

GUEST = "52:54:00:12:34:56"


@pytest.mark.parametrize("kind,mac,expected", [
    ("tun", "fe:54:00:12:34:56", True),       # libvirt's convention
    ("tun", "FE:54:00:12:34:56", True),
    ("tun", "52:54:00:12:34:56", True),       # equal to the guest MAC
    ("macvtap", "fe:54:00:12:34:56", True),
    ("veth", "fe:54:00:12:34:56", False),     # only taps: a veth's peer is not a VM
    ("bridge", "fe:54:00:12:34:56", False),
    ("tun", "fe:54:00:12:34:57", False),
    ("tun", None, False),
], ids=["fe-prefix", "upper-case", "equal", "macvtap", "veth", "bridge", "other-mac", "no-mac"])
def test_tap_matches_mac(kind, mac, expected):
    assert tap_matches_mac(kind, mac, GUEST) is expected


@pytest.mark.parametrize("spec,field,message", [
    ({"name": "vm", "ips": ["10.0.0.2"]}, "interface", "unless mac is given"),
    ({"name": "vm", "ips": ["10.0.0.2"], "mac": "52:54:00"}, "mac", "is not a MAC address"),
    ({"name": "vm", "ips": ["10.0.0.2"], "interface": "x" * 16}, "interface", "max 15"),
], ids=["neither", "bad-mac", "long-interface"])
def test_spec_errors(spec, field, message):
    with pytest.raises(InvalidRequest) as exc:
        parse_spec(spec)
    assert exc.value.field == field and message in str(exc.value)


def test_spec_by_mac_only():
    s = parse_spec({"name": "vm", "ips": ["10.0.0.2"], "mac": "52:54:00:AB:CD:EF"})
    assert s["interface"] is None and s["mac"] == "52:54:00:ab:cd:ef"


def test_mac_bound_record_forgets_the_tap_name():
    ep = Endpoint("vm", 1, "vnet3", ("10.0.0.2",), LabelSet(), mac=GUEST, by_mac=True)
    rec = ep.to_record()
    assert rec["by_mac"] is True and rec["interface"] == ""
    assert Endpoint.from_record(rec).by_mac is True


META = """<stockade:endpoint xmlns:stockade="https://stockade.dev/xmlns/endpoint/1">
  <stockade:label key="app">db</stockade:label>
  <stockade:label key="tier">back</stockade:label>
  <stockade:ip>10.88.250.20</stockade:ip>
  <stockade:interface mac="52:54:00:AA:00:02"><stockade:ip>10.1.0.5</stockade:ip></stockade:interface>
</stockade:endpoint>"""


def test_parse_metadata():
    labels, ips, by_mac = parse_metadata(META)
    assert labels == {"app": "db", "tier": "back"}
    assert ips == ["10.88.250.20"] and by_mac == {"52:54:00:aa:00:02": ["10.1.0.5"]}
    assert parse_metadata(None) == ({}, [], {})


def test_domain_interfaces():
    xml = """<domain><devices>
      <interface type='bridge'><mac address='52:54:00:AA:00:01'/><target dev='vnet7'/></interface>
      <interface type='user'><mac address='52:54:00:aa:00:02'/></interface>
    </devices></domain>"""
    assert domain_interfaces(xml) == [("52:54:00:aa:00:01", "vnet7"), ("52:54:00:aa:00:02", None)]
