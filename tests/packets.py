"""Hand-built Ethernet frames for real-packet tests and the BPF fuzz test.

Small and fast on purpose (the fuzz test builds millions of frames): every builder
returns bytes; checksums are right (receiving kernels verify them), lengths are the
natural ones unless a test overrides them.

    frame = eth(dst_mac, src_mac, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", UDP, udp(1, 2, b"x")))
"""
from __future__ import annotations

import socket
import struct

ETH_IP, ETH_ARP, ETH_IPV6, ETH_VLAN = 0x0800, 0x0806, 0x86DD, 0x8100
ICMP, TCP, UDP, ICMPV6, SCTP = 1, 6, 17, 58, 132
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS, NONE = 0, 43, 44, 51, 60, 59
BROADCAST = "ff:ff:ff:ff:ff:ff"


def mac_bytes(mac: str | bytes) -> bytes:
    return mac if isinstance(mac, bytes) else bytes.fromhex(mac.replace(":", ""))


def ip4(a: str | bytes) -> bytes:
    return a if isinstance(a, bytes) else socket.inet_aton(a)


def ip6(a: str | bytes) -> bytes:
    return a if isinstance(a, bytes) else socket.inet_pton(socket.AF_INET6, a)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst, src, ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", ETH_VLAN, vlan) if vlan is not None else b""
    return mac_bytes(dst) + mac_bytes(src) + tag + struct.pack("!H", ethertype) + payload


def ipv4(src, dst, proto: int, payload: bytes, ttl: int = 64, ident: int = 0,
         flags: int = 0, offset: int = 0, options: bytes = b"", tot_len: int | None = None,
         ihl: int | None = None) -> bytes:
    """``flags``: 0x2 DF, 0x1 MF; ``offset`` in 8-byte units."""
    hl = ihl if ihl is not None else 5 + (len(options) + 3) // 4
    opts = options + b"\0" * (-len(options) % 4)
    total = tot_len if tot_len is not None else 20 + len(opts) + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | (hl & 0xF), 0, total & 0xFFFF, ident,
                      (flags << 13) | offset, ttl, proto, 0, ip4(src), ip4(dst)) + opts
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6(src, dst, nh: int, payload: bytes, hop: int = 64, plen: int | None = None) -> bytes:
    return struct.pack("!IHBB", 6 << 28, len(payload) if plen is None else plen, nh, hop) + \
        ip6(src) + ip6(dst) + payload


def ext6(nh: int, body: bytes = b"\0" * 6) -> bytes:
    """Hop-by-hop, routing or destination options header: ``body`` is padded to a
    multiple of 8 bytes with the two header bytes."""
    body = body + b"\0" * (-(len(body) + 2) % 8)
    return struct.pack("!BB", nh, (len(body) + 2) // 8 - 1) + body


def ah6(nh: int, icv: bytes = b"\0" * 12) -> bytes:
    body = struct.pack("!HII", 0, 0x100, 1) + icv   # reserved, SPI, sequence
    return struct.pack("!BB", nh, (len(body) + 2) // 4 - 2) + body


def frag6(nh: int, offset: int = 0, more: bool = False, ident: int = 1) -> bytes:
    """``offset`` in 8-byte units."""
    return struct.pack("!BBHI", nh, 0, (offset << 3) | int(more), ident)


def router_alert_hbh(nh: int) -> bytes:
    return ext6(nh, b"\x05\x02\x00\x00\x01\x00")   # RFC 2711 option (MLD), PadN


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, flags: int = 0x02, payload: bytes = b"", seq: int = 1) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload


def icmp4(type_: int, code: int = 0, rest: bytes = b"\0\0\0\0", payload: bytes = b"") -> bytes:
    msg = struct.pack("!BBH", type_, code, 0) + rest + payload
    return msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]


def icmp6(src, dst, type_: int, code: int = 0, rest: bytes = b"\0\0\0\0",
          payload: bytes = b"") -> bytes:
    """ICMPv6 message with its checksum over the pseudo-header of ``src`` -> ``dst``."""
    msg = struct.pack("!BBH", type_, code, 0) + rest + payload
    pseudo = ip6(src) + ip6(dst) + struct.pack("!II", len(msg), ICMPV6)
    return msg[:2] + struct.pack("!H", checksum(pseudo + msg)) + msg[4:]


def echo_rest(ident: int, seq: int = 1) -> bytes:
    return struct.pack("!HH", ident, seq)


def arp(op: int, sha, spa, tha, tpa) -> bytes:
    return struct.pack("!HHBBH", 1, ETH_IP, 6, 4, op) + mac_bytes(sha) + ip4(spa) + \
        mac_bytes(tha) + ip4(tpa)


# -- neighbour discovery (RFC 4861) and MLD ------------------------------------------
NS, NA, RS, RA, REDIRECT = 135, 136, 133, 134, 137
MLD_QUERY, MLD_REPORT, MLD_DONE, MLD2_REPORT = 130, 131, 132, 143
NA_ROUTER, NA_SOLICITED, NA_OVERRIDE = 0x80000000, 0x40000000, 0x20000000


def lladdr_opt(kind: int, mac) -> bytes:
    """Source (1) / target (2) link-layer address option."""
    return struct.pack("!BB", kind, 1) + mac_bytes(mac)


def solicited_node(addr: str) -> str:
    last = ip6(addr)[13:]
    return socket.inet_ntop(socket.AF_INET6, ip6("ff02::1:ff00:0")[:13] + last)


def nd_frame(src_mac, dst_mac, src, dst, type_: int, body: bytes, hop: int = 255,
             rest: bytes = b"\0\0\0\0") -> bytes:
    """An ICMPv6 ND/MLD frame: ``body`` follows the 4-byte ``rest`` field."""
    return eth(dst_mac, src_mac, ETH_IPV6,
               ipv6(src, dst, ICMPV6, icmp6(src, dst, type_, 0, rest, body), hop=hop))


def ns_frame(src_mac, dst_mac, src, dst, target: str, hop: int = 255) -> bytes:
    opt = lladdr_opt(1, src_mac) if src != "::" else b""
    return nd_frame(src_mac, dst_mac, src, dst, NS, ip6(target) + opt, hop)


def na_frame(src_mac, dst_mac, src, dst, target: str, flags: int = NA_OVERRIDE,
             hop: int = 255) -> bytes:
    return nd_frame(src_mac, dst_mac, src, dst, NA, ip6(target) + lladdr_opt(2, src_mac), hop,
                    rest=struct.pack("!I", flags))


def multicast_mac(addr: str) -> str:
    """33:33 + the last 4 bytes of an IPv6 multicast address."""
    return "33:33:" + ":".join(f"{b:02x}" for b in ip6(addr)[12:])


def eth_parts(frame: bytes) -> tuple[bytes, bytes, int, bytes]:
    """(dst, src, ethertype, payload) of an untagged frame."""
    return frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0], frame[14:]
