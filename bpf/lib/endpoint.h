/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Endpoint lookups and anti-spoofing.
 *
 * Choices:
 *  - IPv6 link-local sources (fe80::/10) from an endpoint are always accepted: the
 *    workload picks them itself, neighbour discovery needs them, and routers never
 *    forward them off the link. The unspecified source (::) is accepted only for
 *    ND neighbour solicitations and MLD reports (duplicate address detection).
 *  - ARP probes with sender 0.0.0.0 (RFC 5227 address conflict detection) pass.
 *  - Router advertisements and redirects from an endpoint are dropped as spoofed:
 *    a workload is never the router of its link.
 *  - IPv4 source 0.0.0.0 (DHCP discover) is dropped as spoofed: endpoints get
 *    their addresses from the agent, not from DHCP on this link.
 *  - The source MAC is not checked yet.
 */
#ifndef STOCKADE_LIB_ENDPOINT_H
#define STOCKADE_LIB_ENDPOINT_H

/* Is @addr (network order) one of @ep's IPv4 addresses? */
static __always_inline int ep_owns_ip4(const struct endpoint_info *ep, __be32 addr)
{
#pragma unroll
	for (int i = 0; i < EP_MAX_IP4; i++) {
		if (i < ep->n_ip4 && ep->ip4[i] == addr)
			return 1;
	}
	return 0;
}

/* Is @a (4 words, network order) one of @ep's IPv6 addresses? */
static __always_inline int ep_owns_ip6(const struct endpoint_info *ep, const __u32 *a)
{
#pragma unroll
	for (int i = 0; i < EP_MAX_IP6; i++) {
		if (i < ep->n_ip6 && ep->ip6[i].w[0] == a[0] && ep->ip6[i].w[1] == a[1] &&
		    ep->ip6[i].w[2] == a[2] && ep->ip6[i].w[3] == a[3])
			return 1;
	}
	return 0;
}

static __always_inline int ip6_is_link_local(const __u32 *a)
{
	return (bpf_ntohl(a[0]) & 0xffc00000) == 0xfe800000;
}

static __always_inline int ip6_is_unspecified(const __u32 *a)
{
	return (a[0] | a[1] | a[2] | a[3]) == 0;
}

/* ICMPv6 types handled as neighbour discovery / multicast listener traffic. */
static __always_inline int icmp6_is_nd(__u8 type)
{
	return (type >= 130 && type <= 137) || type == 143;
}

/* Anti-spoofing check for an IP packet leaving @ep.
 * Returns 1 when the source address is acceptable, 0 when spoofed. */
static __always_inline int ep_source_ok(const struct endpoint_info *ep, const struct pkt *p)
{
	if (p->family == 4)
		return ep_owns_ip4(ep, p->saddr[0]);
	if (ep_owns_ip6(ep, p->saddr) || ip6_is_link_local(p->saddr))
		return 1;
	if (ip6_is_unspecified(p->saddr) && p->proto == IPPROTO_ICMPV6_ &&
	    (p->icmp_type == 135 || p->icmp_type == 143 || p->icmp_type == 131))
		return 1;
	return 0;
}

/* Neighbour discovery sent by @ep (ICMPv6 type p->icmp_type), source already
 * checked by ep_source_ok. A neighbour advertisement must claim (target) one of
 * the endpoint's own or a link-local address.
 * Returns REASON_NEIGH to forward, REASON_SPOOFED or REASON_INVALID to drop. */
static __always_inline int ep_check_nd_out(struct __sk_buff *skb,
					   const struct endpoint_info *ep, const struct pkt *p)
{
	__u32 target[4];

	switch (p->icmp_type) {
	case 134: /* router advertisement */
	case 137: /* redirect */
		return REASON_SPOOFED;
	case 136: /* neighbour advertisement */
		if (bpf_skb_load_bytes(skb, p->l4_off + 8, target, 16) < 0)
			return REASON_INVALID;
		if (!ep_owns_ip6(ep, target) && !ip6_is_link_local(target))
			return REASON_SPOOFED;
		return REASON_NEIGH;
	default: /* RS, NS, MLD: the source address is the claim */
		return REASON_NEIGH;
	}
}

/* ARP. Toward the endpoint everything passes; from the endpoint the sender
 * protocol address must be one of its IPv4 addresses (or 0.0.0.0, a probe).
 * @arp_spa: out, the claimed sender address (for events).
 * Returns REASON_NEIGH to forward, REASON_SPOOFED / REASON_INVALID to drop. */
static __always_inline int ep_check_arp(struct __sk_buff *skb, const struct endpoint_info *ep,
					int dir, __be32 *arp_spa, __be32 *arp_tpa)
{
	__u8 arp[28];

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, arp, sizeof(arp)) < 0)
		return REASON_INVALID;
	__builtin_memcpy(arp_spa, &arp[14], 4);
	__builtin_memcpy(arp_tpa, &arp[24], 4);
	if (dir == DIR_INGRESS)
		return REASON_NEIGH;
	/* Ethernet (1) / IPv4 (0x0800), 6-byte hw and 4-byte protocol addresses */
	if (arp[0] != 0 || arp[1] != 1 || arp[2] != 0x08 || arp[3] != 0x00 ||
	    arp[4] != 6 || arp[5] != 4)
		return REASON_INVALID;
	if (*arp_spa == 0 || ep_owns_ip4(ep, *arp_spa))
		return REASON_NEIGH;
	return REASON_SPOOFED;
}

#endif
