"""DHCP for endpoints that are not identified yet (issue 14 item 9): a VM that gets its
address by DHCP must get a lease from the host's server, and its requests must
reach nobody else.

The test runs its own dnsmasq (Debian's dnsmasq-base, as libvirt does for its
networks) on its own bridge (tests/netns.py Topology; the bridge gets 10.213.10.1/24
and fd57:10::1/64). V stands for the VM: its host-side veth carries the programs
and its endpoint is unidentified (as the agent writes a managed tap before its VM
is known). O is an identified endpoint on the same bridge that captures every frame
it is given. The v4 client is busybox's udhcpc; the v6 client sends a SOLICIT and
waits for dnsmasq's ADVERTISE (tests below).
"""
from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import tempfile
import time

import pytest

import packets as P
import traffic
from dpenv import ID_B, datapath_env
from netns import run
from stockade.datapath import Reason, Verdict, attach, detach
from stockade.datapath.maps import DIR_EGRESS, DIR_INGRESS
from stockade.datapath.writer import eui64_link_local

pytestmark = pytest.mark.root

SETTINGS = {"STOCKADE_PIN_DIR": f"/sys/fs/bpf/stockade-test-{os.getpid()}-dhcp"}
BRIDGE4, BRIDGE6 = "10.213.10.1", "fd57:10::1"
BUSYBOX = "/usr/bin/busybox"


def _dhcp_client_frame(f: bytes) -> bool:
    """A DHCP client message (v4 UDP 68 -> 67, v6 546 -> 547) in frame ``f``."""
    _, _, et, pl = P.eth_parts(f)
    if et == P.ETH_IP and len(pl) >= 28 and pl[9] == P.UDP:
        off = (pl[0] & 0xF) * 4
        return pl[off:off + 4] == struct.pack("!HH", 68, 67)
    if et == P.ETH_IPV6 and len(pl) >= 48 and pl[6] == P.UDP:
        return pl[40:44] == struct.pack("!HH", 546, 547)
    return False


@pytest.fixture(scope="module")
def env():
    tmp = tempfile.mkdtemp(prefix="stockade-dhcp-", dir="/run")
    proc = None
    with datapath_env(SETTINGS, {"v": [], "o": ["10.213.10.50/24", "fd57:10::50/64"]},
                      tag="h") as env:
        br = env.topo.bridge
        try:
            with open(f"/proc/sys/net/ipv6/conf/{br}/disable_ipv6", "w") as f:
                f.write("0")
            run("ip", "addr", "add", f"{BRIDGE4}/24", "dev", br)
            run("ip", "addr", "add", f"{BRIDGE6}/64", "dev", br, "nodad")
            env.leases = os.path.join(tmp, "leases")
            env.log = os.path.join(tmp, "dnsmasq.log")
            proc = subprocess.Popen(
                ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                 f"--interface={br}", "--bind-interfaces", "--except-interface=lo",
                 "--dhcp-range=10.213.10.100,10.213.10.150,255.255.255.0,1h",
                 "--dhcp-range=fd57:10::100,fd57:10::1ff,64,1h", "--dhcp-authoritative",
                 "--no-ping", f"--dhcp-leasefile={env.leases}", "--pid-file=",
                 "--user=root", "--group=root", "--log-dhcp", f"--log-facility={env.log}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            # dnsmasq is up once its log says it serves our range
            ready = traffic.eventually(lambda: proc.poll() is not None or (
                os.path.exists(env.log) and "DHCPv6, IP range" in open(env.log).read()),
                timeout=10)
            assert ready and proc.poll() is None, proc.stderr.read().decode() if proc.poll() \
                is not None else "dnsmasq did not start"
            v = env.v
            v.ll = str(eui64_link_local(P.mac_bytes(v.mac)))
            assert traffic.eventually(lambda: not any(
                w.exec("ip", "-6", "addr", "show", "dev", "eth0", "tentative").stdout.strip()
                for w in (env.v, env.o)), timeout=10)
            yield env
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
            subprocess.run(["rm", "-rf", tmp], check=False)


@pytest.fixture
def e(env):
    env.dp.flush()
    env.dp.set_endpoint(env.v.host_ifindex, 0, 0, unidentified=True)
    env.dp.set_endpoint(env.o.host_ifindex, 2, ID_B, env.o.ips, mac=env.o.mac)
    env.v.exec("ip", "-4", "addr", "flush", "dev", "eth0")
    yield env
    env.dp.flush()


def udhcpc(w, timeout=15) -> str | None:
    """Run busybox's DHCP client in ``w`` once; the leased address, or None."""
    r = w.exec(BUSYBOX, "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "4", "-T", "1",
               "-s", "/bin/true", check=False, timeout=timeout)
    m = re.search(r"lease of (\S+) obtained", r.stdout + r.stderr)
    return m.group(1) if m else None


def test_unidentified_vm_gets_a_v4_lease_and_nobody_sees_its_discover(e):
    with traffic.Capture(e.o) as cap:
        lease = udhcpc(e.v)
        assert lease and lease.startswith("10.213.10.1")
        time.sleep(0.2)
        assert not cap.seen(_dhcp_client_frame)
    assert lease in open(e.leases).read()
    c = e.dp.counters()
    assert c[(DIR_EGRESS, Verdict.FORWARDED, Reason.DHCP)][0] >= 2     # discover, request
    assert c[(DIR_INGRESS, Verdict.FORWARDED, Reason.DHCP)][0] >= 2    # offer, ack
    assert (DIR_EGRESS, Verdict.FORWARDED, Reason.NONE) not in c      # nothing else passed


def test_without_stockade_the_discover_is_flooded(e):
    """Control: with no programs on V's veth the bridge floods the DISCOVER to O."""
    detach(e.v.host_ifindex)
    try:
        with traffic.Capture(e.o) as cap:
            assert udhcpc(e.v)
            assert cap.wait(_dhcp_client_frame, timeout=1)
    finally:
        attach(e.v.host_ifindex, e.dp.from_endpoint_fd, e.dp.to_endpoint_fd)


def test_identified_by_its_lease_then_ordinary_traffic(e):
    """Once identified by its lease, V is an ordinary endpoint; its DHCP still goes to
    the host only."""
    lease = udhcpc(e.v)
    assert lease
    assert not traffic.ping_ok(e.v, e.o.ip4)                   # still unidentified
    e.v.exec("ip", "addr", "add", f"{lease}/24", "dev", "eth0")
    e.dp.set_endpoint(e.v.host_ifindex, 1, 1001, [lease], mac=e.v.mac)
    e.dp.set_ipcache(lease, 1001)
    assert traffic.eventually(lambda: traffic.ping_ok(e.v, e.o.ip4), timeout=10)
    with traffic.Capture(e.o) as cap:
        assert udhcpc(e.v) == lease                            # renewal from its address
        time.sleep(0.2)
        assert not cap.seen(_dhcp_client_frame)


def test_other_traffic_of_an_unidentified_endpoint_is_dropped(e):
    """Not DHCP, not the ND the host needs: dropped, and O sees none of it."""
    v, o = e.v, e.o
    frames = [
        # DHCP-looking but unicast to O, and to the wrong port
        P.eth(o.mac, v.mac, P.ETH_IP, P.ipv4("0.0.0.0", o.ip4, P.UDP, P.udp(68, 67, b"x"))),
        P.eth(P.BROADCAST, v.mac, P.ETH_IP, P.ipv4("0.0.0.0", "255.255.255.255", P.UDP,
                                                   P.udp(68, 69, b"x"))),
        # an ARP for O, an NA claiming O's address
        P.eth(P.BROADCAST, v.mac, P.ETH_ARP, P.arp(1, v.mac, "10.213.10.120", "00" * 6, o.ip4)),
        P.na_frame(v.mac, P.multicast_mac("ff02::1"), v.ll, "ff02::1", o.ip6),
    ]
    with traffic.Capture(o) as cap:
        traffic.send_frames(v, frames)
        assert traffic.eventually(lambda: e.dp.counters().get(
            (DIR_EGRESS, Verdict.DROPPED, Reason.UNKNOWN_ENDPOINT), (0,))[0] == len(frames))
        time.sleep(0.2)
        assert not any(f in cap.frames for f in frames)


def _solicit(mac: bytes, xid: bytes) -> bytes:
    duid = struct.pack("!HH", 3, 1) + mac                      # DUID-LL, Ethernet
    opts = struct.pack("!HH", 1, len(duid)) + duid             # client identifier
    opts += struct.pack("!HHH", 8, 2, 0)                       # elapsed time
    opts += struct.pack("!HHIII", 3, 12, 1, 0, 0)              # IA_NA 1
    return b"\x01" + xid + opts


def test_unidentified_vm_gets_a_v6_advertise_and_nobody_sees_its_solicit(e):
    """SOLICIT from V's link-local address to ff02::1:2 reaches dnsmasq only; its
    ADVERTISE comes back (after the host resolved V's link-local address)."""
    v, xid = e.v, os.urandom(3)
    idx = v.eth0_ifindex()
    sock = v.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.bind((v.ll, 546, 0, idx))
        sock.settimeout(1)
        with traffic.Capture(e.o) as cap:
            reply = None
            for _ in range(5):
                sock.sendto(_solicit(P.mac_bytes(v.mac), xid), ("ff02::1:2", 547, 0, idx))
                try:
                    data, src = sock.recvfrom(2048)
                except socket.timeout:
                    continue
                if data[1:4] == xid:
                    reply = (data, src)
                    break
            assert reply is not None, open(e.log).read()[-2000:]
            assert reply[0][0] == 2                             # ADVERTISE
            assert P.ip6("fd57:10::100") <= _ia_addr(reply[0]) <= P.ip6("fd57:10::1ff")
            assert not cap.seen(_dhcp_client_frame)
    finally:
        sock.close()
    c = e.dp.counters()
    assert c[(DIR_EGRESS, Verdict.FORWARDED, Reason.DHCP)][0] >= 1
    assert c[(DIR_INGRESS, Verdict.FORWARDED, Reason.DHCP)][0] >= 1
    assert c[(DIR_EGRESS, Verdict.FORWARDED, Reason.NEIGH)][0] >= 1    # its NA, to the host


def _ia_addr(msg: bytes) -> bytes:
    """The first IA address (option 5 inside option 3) of a DHCPv6 message."""
    i = 4
    while i + 4 <= len(msg):
        code, ln = struct.unpack("!HH", msg[i:i + 4])
        if code == 3:
            j = i + 16
            while j + 4 <= i + 4 + ln:
                c2, l2 = struct.unpack("!HH", msg[j:j + 4])
                if c2 == 5:
                    return msg[j + 4:j + 20]
                j += 4 + l2
        i += 4 + ln
    return b""


def test_replies_from_another_endpoint_do_not_pass(e):
    """A DHCP 'server' answering from another endpoint (O) is not the host: its offer
    toward the unidentified V is dropped."""
    o, v = e.o, e.v
    offer = P.eth(v.mac, o.mac, P.ETH_IP, P.ipv4(o.ip4, "255.255.255.255", P.UDP,
                                                 P.udp(67, 68, b"\x02" + b"\0" * 240)))
    with traffic.Capture(v) as cap:
        traffic.send_frames(o, [offer])
        assert traffic.eventually(lambda: e.dp.counters().get(
            (DIR_INGRESS, Verdict.DROPPED, Reason.UNKNOWN_ENDPOINT), (0,))[0] >= 1)
        time.sleep(0.2)
        assert offer not in cap.frames
