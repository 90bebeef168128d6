/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Packet parsing into struct pkt. All reads go through bpf_skb_load_bytes, which
 * keeps the verifier simple (no packet-pointer range proofs) at a small cost.
 */
#ifndef STOCKADE_LIB_PARSE_H
#define STOCKADE_LIB_PARSE_H

#define ETH_HLEN_ 14
#define ETHERTYPE_IP   0x0800
#define ETHERTYPE_ARP  0x0806
#define ETHERTYPE_IPV6 0x86DD

#define IPPROTO_ICMP_   1
#define IPPROTO_TCP_    6
#define IPPROTO_UDP_    17
#define IPPROTO_ICMPV6_ 58
#define IPPROTO_SCTP_   132

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define IPV6_MAX_EXT_HEADERS 6

/* What the datapath needs from one IP packet, or from the header embedded in an
 * ICMP error. Addresses in network order; IPv4 uses word 0 only. */
struct pkt {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;       /* TCP/UDP/SCTP ports; ICMP echo: identifier */
	__be16 dport;
	__u8 family;        /* 4 or 6 */
	__u8 proto;
	__u8 has_ports;     /* 1 when the port (or ICMP type) is known */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 fragment;      /* 1 for non-first fragments */
	__u8 match;         /* MATCH_* of the policy decision, for events */
	__u32 l4_off;       /* offset of the L4 header in the skb */
};

/* Is this ICMP/ICMPv6 type an echo request or reply (tracked by identifier)? */
static __always_inline int icmp_is_echo(__u8 family, __u8 type)
{
	if (family == 4)
		return type == 8 || type == 0;
	return type == 128 || type == 129;
}

/* Is this an ICMP error that embeds the offending packet's header?
 * v4: destination unreachable (3), time exceeded (11);
 * v6: destination unreachable (1), packet too big (2), time exceeded (3). */
static __always_inline int icmp_is_error(__u8 family, __u8 type)
{
	if (family == 4)
		return type == 3 || type == 11;
	return type == 1 || type == 2 || type == 3;
}

/* Parse the L4 header at p->l4_off: ports, TCP flags, ICMP type and echo id.
 * @skb: packet; @p: filled in place (p->proto, p->family, p->l4_off set);
 * @quoted: 1 for a header quoted in an ICMP error (only 8 bytes are guaranteed).
 * Returns 0, or -1 when the header is truncated. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p, int quoted)
{
	__u8 buf[8] = {};

	if (p->fragment)
		return 0;
	switch (p->proto) {
	case IPPROTO_TCP_:
	case IPPROTO_UDP_:
	case IPPROTO_SCTP_:
		if (bpf_skb_load_bytes(skb, p->l4_off, buf, 8) < 0)
			return -1;
		__builtin_memcpy(&p->sport, &buf[0], 2);
		__builtin_memcpy(&p->dport, &buf[2], 2);
		p->has_ports = 1;
		if (p->proto == IPPROTO_TCP_ && !quoted &&
		    bpf_skb_load_bytes(skb, p->l4_off + 13, &p->tcp_flags, 1) < 0)
			return -1;
		return 0;
	case IPPROTO_ICMP_:
	case IPPROTO_ICMPV6_:
		if (bpf_skb_load_bytes(skb, p->l4_off, buf, 8) < 0)
			return -1;
		p->icmp_type = buf[0];
		p->icmp_code = buf[1];
		if (icmp_is_echo(p->family, buf[0])) {
			__builtin_memcpy(&p->sport, &buf[4], 2);
			p->dport = p->sport;
		}
		p->has_ports = 1;
		return 0;
	default:
		return 0;
	}
}

/* Parse an IPv4 header at @off. Returns 0 or -1 (malformed/truncated). */
static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct pkt *p)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	p->family = 4;
	p->saddr[0] = ip.saddr;
	p->daddr[0] = ip.daddr;
	p->proto = ip.protocol;
	p->fragment = (bpf_ntohs(ip.frag_off) & 0x1fff) != 0;
	p->l4_off = off + ip.ihl * 4;
	return 0;
}

/* Parse an IPv6 header at @off and walk up to IPV6_MAX_EXT_HEADERS extension
 * headers (hop-by-hop, routing, destination options, fragment, AH).
 * Returns 0 or -1 (malformed/truncated/too many extension headers). */
static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct pkt *p,
				      int walk_ext)
{
	struct ipv6hdr ip6;
	__u8 nh;
	__u8 ext[4];

	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
		return -1;
	if (ip6.version != 6)
		return -1;
	p->family = 6;
	__builtin_memcpy(p->saddr, &ip6.saddr, 16);
	__builtin_memcpy(p->daddr, &ip6.daddr, 16);
	nh = ip6.nexthdr;
	off += sizeof(ip6);
	if (walk_ext) {
#pragma unroll
		for (int i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
			if (nh != 0 && nh != 43 && nh != 60 && nh != 44 && nh != 51)
				break;
			if (bpf_skb_load_bytes(skb, off, ext, 4) < 0)
				return -1;
			if (nh == 44) {
				__u16 fo = ((__u16)ext[2] << 8) | ext[3];
				if (fo & 0xfff8)
					p->fragment = 1;
				nh = ext[0];
				off += 8;
			} else if (nh == 51) {
				nh = ext[0];
				off += ((__u32)ext[1] + 2) * 4;
			} else {
				nh = ext[0];
				off += ((__u32)ext[1] + 1) * 8;
			}
		}
		if (nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51)
			return -1;
	}
	p->proto = nh;
	p->l4_off = off;
	return 0;
}

/* Parse the offending packet embedded in an ICMP error (8 bytes after the ICMP
 * header start) into @inner. Returns 0 or -1. */
static __always_inline int parse_icmp_inner(struct __sk_buff *skb, struct pkt *outer,
					    struct pkt *inner)
{
	__u32 off = outer->l4_off + 8;
	int ret;

	if (outer->family == 4)
		ret = parse_ipv4(skb, off, inner);
	else
		ret = parse_ipv6(skb, off, inner, 0);
	if (ret < 0)
		return -1;
	/* The error quotes at least 8 bytes of L4: ports / ICMP id are there. */
	return parse_l4(skb, inner, 1);
}

#endif
