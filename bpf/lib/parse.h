/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Packet parsing into struct pkt.
 *
 * The headers every packet has (Ethernet type, the IPv4 or fixed IPv6 header, the L4
 * header) are read with direct packet access (skb->data .. skb->data_end, no helper
 * call) when they are in the linear part of the skb, as they nearly always are, else
 * with bpf_skb_load_bytes (pkt_load). Rarer reads (IPv6 extension headers, ND
 * targets, the packet quoted in an ICMP error, ARP) always use bpf_skb_load_bytes
 * (pkt_load_slow): each direct read is two paths for the verifier, and the program
 * must stay well within older kernels' verifier limits. Both give the same bytes.
 *
 * Fragments (IPv4 and IPv6): the first fragment is parsed like any packet and also
 * recorded in the frag map (datapath.h); a later fragment has no L4 header, so its
 * protocol and ports come from that record. The IPv6 extension-header walk stops at
 * a fragment header with a non-zero offset: what follows is payload, not headers.
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

/* Largest offset read with direct packet access (the verifier needs a bound). */
#define PKT_DIRECT_MAX_OFF 1024

/* struct pkt.fragment */
#define FRAG_NONE  0
#define FRAG_FIRST 1 /* offset 0, more fragments follow: has the L4 header */
#define FRAG_LATER 2 /* offset > 0: no L4 header */

/* What the datapath needs from one IP packet, or from the header embedded in an
 * ICMP error. Addresses in network order; IPv4 uses word 0 only. */
struct pkt {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;       /* TCP/UDP/SCTP ports; ICMP query messages: identifier */
	__be16 dport;       /* ICMP: 0 */
	__u8 family;        /* 4 or 6 */
	__u8 proto;
	__u8 has_ports;     /* 1 when the port (or ICMP type) is known */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 fragment;      /* FRAG_* */
	__u8 match;         /* MATCH_* of the policy decision, for events */
	__u8 hop_limit;     /* IPv4 TTL / IPv6 hop limit */
	__u8 frag_proto;    /* IPv4 protocol / next header of the IPv6 fragment header */
	__u8 pad[2];
	__u32 frag_id;      /* IP identification (IPv4: 16 bits, network order) */
	__u32 l4_off;       /* offset of the L4 header in the skb */
	__u32 policy_ids[2]; /* policy_id of the exact and the any-peer entry that matched */
};

/* skb->data and skb->data_end, each read straight from the context register: clang
 * would otherwise keep "skb + offset" in a register or on the stack, which the
 * verifier refuses to dereference ("modified ctx ptr"). */
static __always_inline void *skb_data(struct __sk_buff *skb)
{
	void *p;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(p)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data)));
	return p;
}

static __always_inline void *skb_data_end(struct __sk_buff *skb)
{
	void *p;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(p)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data_end)));
	return p;
}

/* Copy @len bytes at offset @off of @skb into @to through the helper. Returns 0, or
 * -1 when the packet is shorter. */
static __always_inline int pkt_load_slow(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	return bpf_skb_load_bytes(skb, off, to, len) < 0 ? -1 : 0;
}

/* The same, straight from the packet when the bytes are linear. @len must be a
 * constant (the copy is unrolled into loads). */
static __always_inline int pkt_load(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	void *data = skb_data(skb);
	void *end = skb_data_end(skb);

	if (off <= PKT_DIRECT_MAX_OFF) {
		void *from = data + off;

		if (from + len <= end) {
			__builtin_memcpy(to, from, len);
			return 0;
		}
	}
	return bpf_skb_load_bytes(skb, off, to, len) < 0 ? -1 : 0;
}

/* ICMP query messages: they carry an identifier (bytes 4-5), and a request has
 * exactly one reply type. v4: echo 8/0, timestamp 13/14, information 15/16,
 * address mask 17/18; v6: echo 128/129. */
static __always_inline int icmp_is_query(__u8 family, __u8 type)
{
	if (family == 4)
		return type == 8 || type == 0 || (type >= 13 && type <= 18);
	return type == 128 || type == 129;
}

/* The request type whose reply @type is, or -1 when @type is not a query reply. */
static __always_inline int icmp_request_of(__u8 family, __u8 type)
{
	if (family == 4) {
		if (type == 0)
			return 8;
		if (type == 14 || type == 16 || type == 18)
			return type - 1;
		return -1;
	}
	return type == 129 ? 128 : -1;
}

/* Is this an ICMP error that embeds the offending packet's header?
 * v4: destination unreachable (3), time exceeded (11), parameter problem (12);
 * v6: destination unreachable (1), packet too big (2), time exceeded (3),
 *     parameter problem (4). */
static __always_inline int icmp_is_error(__u8 family, __u8 type)
{
	if (family == 4)
		return type == 3 || type == 11 || type == 12;
	return type >= 1 && type <= 4;
}

static __always_inline int proto_is_icmp(__u8 proto)
{
	return proto == IPPROTO_ICMP_ || proto == IPPROTO_ICMPV6_;
}

/* Parse the L4 header at p->l4_off: ports, TCP flags, ICMP type and identifier.
 * @skb: packet; @p: filled in place (p->proto, p->family, p->l4_off set);
 * @quoted: 1 for a header quoted in an ICMP error (only 8 bytes are guaranteed).
 * A later fragment has no L4 header: nothing is read.
 * Returns 0, or -1 when the header is truncated. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p, int quoted)
{
	__u8 buf[14];

	if (p->fragment == FRAG_LATER)
		return 0;
	switch (p->proto) {
	case IPPROTO_TCP_:
		if (!quoted) {
			if (pkt_load(skb, p->l4_off, buf, 14) < 0)
				return -1;
			p->tcp_flags = buf[13];
		} else if (pkt_load_slow(skb, p->l4_off, buf, 8) < 0) {
			return -1;
		}
		break;
	case IPPROTO_UDP_:
	case IPPROTO_SCTP_:
		if ((quoted ? pkt_load_slow(skb, p->l4_off, buf, 8) :
			      pkt_load(skb, p->l4_off, buf, 8)) < 0)
			return -1;
		break;
	case IPPROTO_ICMP_:
	case IPPROTO_ICMPV6_:
		if ((quoted ? pkt_load_slow(skb, p->l4_off, buf, 8) :
			      pkt_load(skb, p->l4_off, buf, 8)) < 0)
			return -1;
		p->icmp_type = buf[0];
		p->icmp_code = buf[1];
		if (icmp_is_query(p->family, buf[0]))
			__builtin_memcpy(&p->sport, &buf[4], 2);
		p->has_ports = 1;
		return 0;
	default:
		return 0;
	}
	__builtin_memcpy(&p->sport, &buf[0], 2);
	__builtin_memcpy(&p->dport, &buf[2], 2);
	p->has_ports = 1;
	return 0;
}

/* Parse an IPv4 header at @off (@quoted: inside an ICMP error).
 * Returns 0 or -1 (malformed/truncated). */
static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct pkt *p,
				      int quoted)
{
	struct iphdr ip;
	__u16 fo;

	if ((quoted ? pkt_load_slow(skb, off, &ip, sizeof(ip)) :
		      pkt_load(skb, off, &ip, sizeof(ip))) < 0)
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	p->family = 4;
	p->saddr[0] = ip.saddr;
	p->daddr[0] = ip.daddr;
	p->proto = ip.protocol;
	p->frag_proto = ip.protocol;
	p->hop_limit = ip.ttl;
	p->frag_id = ip.id;
	fo = bpf_ntohs(ip.frag_off);
	if (fo & 0x1fff)
		p->fragment = FRAG_LATER;
	else if (fo & 0x2000)
		p->fragment = FRAG_FIRST;
	p->l4_off = off + ip.ihl * 4;
	return 0;
}

static __always_inline int ip6_is_ext_header(__u8 nh)
{
	return nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51;
}

/* Parse an IPv6 header at @off; with @walk_ext (the packet itself, not one quoted in
 * an ICMP error), walk up to IPV6_MAX_EXT_HEADERS
 * extension headers (hop-by-hop, routing, destination options, fragment, AH),
 * stopping after a fragment header with a non-zero offset (p->proto is then its
 * next header and p->fragment FRAG_LATER). An atomic fragment (offset 0, no more
 * fragments) is an unfragmented packet.
 * Returns 0 or -1 (malformed/truncated/too many extension headers). */
static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct pkt *p,
				      int walk_ext)
{
	struct ipv6hdr ip6;
	__u8 nh;
	__u8 ext[8];

	if ((walk_ext ? pkt_load(skb, off, &ip6, sizeof(ip6)) :
			pkt_load_slow(skb, off, &ip6, sizeof(ip6))) < 0)
		return -1;
	if (ip6.version != 6)
		return -1;
	p->family = 6;
	__builtin_memcpy(p->saddr, &ip6.saddr, 16);
	__builtin_memcpy(p->daddr, &ip6.daddr, 16);
	p->hop_limit = ip6.hop_limit;
	nh = ip6.nexthdr;
	off += sizeof(ip6);
	if (walk_ext) {
#pragma unroll
		for (int i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
			if (!ip6_is_ext_header(nh))
				break;
			if (pkt_load_slow(skb, off, ext, 8) < 0)
				return -1;
			if (nh == 44) {
				__u16 fo = ((__u16)ext[2] << 8) | ext[3];

				nh = ext[0];
				off += 8;
				p->frag_proto = nh;
				__builtin_memcpy(&p->frag_id, &ext[4], 4);
				if (fo & 0xfff8) {
					p->fragment = FRAG_LATER;
					p->proto = nh;
					p->l4_off = off;
					return 0;
				}
				if (fo & 1)
					p->fragment = FRAG_FIRST;
			} else if (nh == 51) {
				nh = ext[0];
				off += ((__u32)ext[1] + 2) * 4;
			} else {
				nh = ext[0];
				off += ((__u32)ext[1] + 1) * 8;
			}
		}
		if (ip6_is_ext_header(nh))
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
		ret = parse_ipv4(skb, off, inner, 1);
	else
		ret = parse_ipv6(skb, off, inner, 0);
	if (ret < 0)
		return -1;
	/* The error quotes at least 8 bytes of L4: ports / ICMP id are there. */
	return parse_l4(skb, inner, 1);
}

#endif
