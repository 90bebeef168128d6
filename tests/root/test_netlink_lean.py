"""The lean link and address reads (stockade.netlink: pyroute2 dumps streamed, stats
left out by the kernel, each link reduced to the fields used) say what pyroute2's full
decoding says, for veths into a namespace, a bridge and its ports, a tap; a single link
by index; the link watcher hands over the links present at its start, and its events
name a port's master and report a link that goes."""
from __future__ import annotations

import queue
import time

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netns import Topology, run
from stockade import netlink
from stockade.daemon.links import LinkWatcher, host_addresses, list_links
from stockade.discovery import find_host_veth

pytestmark = pytest.mark.root


def _pyroute2_links():
    with IPRoute() as ipr:
        out = []
        for m in ipr.get_links():
            info = m.get_attr("IFLA_LINKINFO")
            out.append((m["index"], m.get_attr("IFLA_IFNAME"),
                        info.get_attr("IFLA_INFO_KIND") if info is not None else None,
                        m.get_attr("IFLA_MASTER"), m.get_attr("IFLA_LINK"),
                        m.get_attr("IFLA_LINK_NETNSID"), m.get_attr("IFLA_ADDRESS")))
        return out


def _ours(link: netlink.LinkInfo):
    return tuple(link)


@pytest.fixture
def topo():
    with Topology("nl") as t:
        t.add_workload("a", ["10.213.61.1/24"])
        t.add_workload("b", ["10.213.61.2/24", "fd00:213:61::2/64"])
        tap = f"{t.prefix}tp"
        run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        t._links.append(tap)
        run("ip", "addr", "add", "10.213.62.1/24", "dev", t.bridge)
        yield t


def test_links_and_addresses_read_as_pyroute2_reads_them(topo):
    ours = [_ours(link) for link in netlink.link_infos()]
    assert ours == _pyroute2_links()
    assert netlink.link_indexes() == [link[0] for link in ours]
    with IPRoute(nlm_generator=True) as ipr:     # on an open socket, which serves on after
        assert netlink.link_indexes_with(ipr) == [link[0] for link in ours]
        assert netlink.link_indexes_with(ipr) == [link[0] for link in ours]
    kinds = {name: kind for _, name, kind, *_ in ours}
    a = topo.workloads["a"]
    assert kinds[a.host_if] == "veth" and kinds[topo.bridge] == "bridge"
    assert kinds[f"{topo.prefix}tp"] == "tun"
    one = netlink.get_link(a.host_ifindex)
    assert _ours(one) in ours and one.netnsid is not None and one.link == a.eth0_ifindex()
    by_name = {link.name: link for link in list_links()}
    assert by_name[a.host_if].master == topo.bridge and by_name[a.host_if].kind == "veth"
    with IPRoute() as ipr:
        want = sorted({m.get_attr("IFA_ADDRESS") for m in ipr.get_addr()})
    assert host_addresses() == want and "10.213.62.1" in want


def test_a_link_is_read_without_its_statistics(topo):
    a = topo.workloads["a"]
    with IPRoute() as ipr:
        (full,) = ipr.link("get", index=a.host_ifindex)
        (lean,) = ipr.link("get", index=a.host_ifindex, ext_mask=netlink.RTEXT_FILTER_SKIP_STATS)
        dumped = [m for m in ipr.link("dump", match=None, ext_mask=netlink.RTEXT_FILTER_SKIP_STATS)
                  if m["index"] == a.host_ifindex]
    assert "IFLA_INET6_STATS" in str(full) and "IFLA_INET6_STATS" not in str(lean)
    assert len(dumped) == 1 and "IFLA_INET6_STATS" not in str(dumped[0])
    assert lean["header"]["length"] < full["header"]["length"]


def test_a_link_that_is_not_there_is_enodev():
    with pytest.raises(NetlinkError) as exc:
        netlink.get_link(2**31 - 1)
    assert exc.value.code == 19


def test_the_host_veth_of_a_namespace_is_found(topo):
    b = topo.workloads["b"]
    found = find_host_veth(netns_path=f"/run/netns/{b.ns}", mac=b.mac)
    assert found is not None
    assert (found.ifname, found.ifindex, found.container_ifindex, found.mac) == (
        b.host_if, b.host_ifindex, b.eth0_ifindex(), b.mac)


def test_the_watcher_reports_new_and_gone_links_with_their_master(topo):
    events: queue.Queue = queue.Queue()
    watcher = LinkWatcher(lambda kind, link: events.put((kind, link)))
    try:
        present = watcher.start()
        assert topo.workloads["a"].host_if in {link.name for link in present}
        w = topo.add_workload("c", ["10.213.61.3/24"])
        seen = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and seen.get(w.host_if, (None, None))[1] is None:
            kind, link = events.get(timeout=max(0.1, deadline - time.monotonic()))
            if link.name == w.host_if and kind == "new":
                seen[w.host_if] = (link, link.master)
        link, master = seen[w.host_if]
        assert (link.ifindex, link.kind, master) == (w.host_ifindex, "veth", topo.bridge)
        topo.remove_workload("c")
        deadline = time.monotonic() + 10
        while True:
            kind, link = events.get(timeout=max(0.1, deadline - time.monotonic()))
            if kind == "del" and link.ifindex == w.host_ifindex:
                break
        assert link.name == w.host_if
    finally:
        watcher.stop()
