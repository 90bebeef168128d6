"""Which delivery devices have their IPv6 off (``ipv6_disabled``) and what the L7
manager says of them; the real packets are in tests/root/test_l7_ipv6_off.py."""
import threading

from stockade.datapath.maps import L7_CLIENT, L7_SERVER
from stockade.l7.host import ipv6_disabled
from stockade.l7.proxy import L7Proxy


def conf(tmp_path, **devs: int) -> str:
    for name, value in devs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "disable_ipv6").write_text(f"{value}\n")
    return str(tmp_path)


def test_only_devices_with_ipv6_off_and_present(tmp_path):
    d = conf(tmp_path, br0=1, br1=0, **{"eth0.100": 1})
    assert ipv6_disabled(["br1", "br0", "gone", "eth0.100"], conf=d) == ["br0", "eth0.100"]
    assert ipv6_disabled([], conf=d) == []


def test_no_ipv6_in_the_kernel_is_off_everywhere(tmp_path):
    assert ipv6_disabled(["br0", "tap1"], conf=str(tmp_path / "none")) == ["br0", "tap1"]


def proxy(d: str, wanted: dict) -> L7Proxy:
    p = object.__new__(L7Proxy)
    p._lock, p._v6_off, p._v6_read, p.ipv6_conf = threading.RLock(), {}, 0.0, d
    p._v6_wanted = wanted
    p.wanted, p.proc, p.restarts, p.last_error, p._targets = True, None, 0, None, set()
    return p


def test_problems_name_the_device_the_sysctl_and_the_endpoints(tmp_path):
    d = conf(tmp_path, br0=1, br1=0, **{"eth0.7": 1})
    names = {f"w{i}": {L7_SERVER} for i in range(7)}
    p = proxy(d, {"br0": (True, {"b": {L7_SERVER}}), "br1": (True, {"x": {L7_SERVER}}),
                  "eth0.7": (False, {"c": {L7_CLIENT}, "s": {L7_SERVER}, **names})})
    p._check_ipv6()
    assert sorted(p._v6_off) == ["br0", "eth0.7"]
    assert p._v6_off["br0"] == (
        "bridge br0 has IPv6 disabled (net.ipv6.conf.br0.disable_ipv6=1): IPv6 connections "
        "to HTTP ports of its endpoints are dropped (endpoints: b)")
    assert p._v6_off["eth0.7"] == (
        "interface eth0.7 has IPv6 disabled (net.ipv6.conf.eth0/7.disable_ipv6=1): IPv6 "
        "connections to and from HTTP ports of its endpoints are dropped (endpoints: c, s, "
        "w0, w1, w2 and 4 more)")
    p._v6_wanted = {"br0": (True, {"a": {L7_CLIENT}})}
    p._check_ipv6()
    assert list(p._v6_off.values()) == [
        "bridge br0 has IPv6 disabled (net.ipv6.conf.br0.disable_ipv6=1): IPv6 connections "
        "from its endpoints to HTTP ports are dropped (endpoints: a)"]
    (tmp_path / "br0" / "disable_ipv6").write_text("0\n")
    p._check_ipv6()
    assert p._v6_off == {}
