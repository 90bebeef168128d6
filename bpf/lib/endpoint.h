/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Endpoint lookups, anti-spoofing, neighbour discovery and DHCP.
 *
 * Sources an endpoint may use:
 *  - IPv4: its addresses. 0.0.0.0 only in DHCP client messages, which go to the
 *    host's DHCP server and nowhere else (see dhcp_*), and in ARP probes.
 *  - IPv6: its addresses and its link-local addresses (endpoint_info.ll: learned
 *    from the workload's namespace, or derived from its MAC). The unspecified
 *    address only in neighbour solicitations for duplicate address detection (whose
 *    target must be the endpoint's own address), router solicitations and MLD
 *    reports. Any other fe80::/10 source is spoofed.
 *
 * Neighbour discovery and MLD (ICMPv6 130-136, 143) skip conntrack and policy
 * only when they stay on the link: hop limit 255 (MLD: 1), and a link-local or
 * link-scope multicast destination (MLD: any multicast, as hop limit 1 is never
 * forwarded). Unicast to a global address is link traffic only for NS/NA between
 * neighbours: sent to an address in one of the endpoint's own /64s, or, toward the
 * endpoint, with hop limit 255 (a router would have decremented it). Everything
 * else, router solicitations to the world included, goes through conntrack and
 * policy like any ICMPv6. A neighbour advertisement from an endpoint must claim
 * (target) one of its own addresses; router advertisements and redirects from an
 * endpoint are always dropped (a workload is never the router of its link).
 * Toward the endpoint, router advertisements and redirects must also come from a
 * link-local source (RFC 4861 6.1.2, 8.1). Fragmented ND is never ND (RFC 6980).
 *
 * The source MAC is not checked yet.
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

static __always_inline int ip6_eq(const struct ip6_words *w, const __u32 *a)
{
	return w->w[0] == a[0] && w->w[1] == a[1] && w->w[2] == a[2] && w->w[3] == a[3];
}

/* Is @a (4 words, network order) one of @ep's IPv6 addresses (not link-local)? */
static __always_inline int ep_owns_ip6(const struct endpoint_info *ep, const __u32 *a)
{
#pragma unroll
	for (int i = 0; i < EP_MAX_IP6; i++) {
		if (i < ep->n_ip6 && ip6_eq(&ep->ip6[i], a))
			return 1;
	}
	return 0;
}

/* Is @a one of @ep's link-local addresses? */
static __always_inline int ep_owns_ll(const struct endpoint_info *ep, const __u32 *a)
{
#pragma unroll
	for (int i = 0; i < EP_MAX_LL; i++) {
		if (i < ep->n_ll && ip6_eq(&ep->ll[i], a))
			return 1;
	}
	return 0;
}

static __always_inline int ep_owns_any_ip6(const struct endpoint_info *ep, const __u32 *a)
{
	return ep_owns_ip6(ep, a) || ep_owns_ll(ep, a);
}

/* Is @a in the same /64 as one of @ep's (global) IPv6 addresses? */
static __always_inline int ep_on_own_64(const struct endpoint_info *ep, const __u32 *a)
{
#pragma unroll
	for (int i = 0; i < EP_MAX_IP6; i++) {
		if (i < ep->n_ip6 && ep->ip6[i].w[0] == a[0] && ep->ip6[i].w[1] == a[1])
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

static __always_inline int ip6_is_multicast(const __u32 *a)
{
	return (bpf_ntohl(a[0]) >> 24) == 0xff;
}

/* Multicast with interface-local or link-local scope (ff01::/16, ff02::/16, ...) */
static __always_inline int ip6_is_link_multicast(const __u32 *a)
{
	return ip6_is_multicast(a) && ((bpf_ntohl(a[0]) >> 16) & 0xf) <= 2;
}

/* ff02::1:ffXX:XXXX */
static __always_inline int ip6_is_solicited_node(const __u32 *a)
{
	return bpf_ntohl(a[0]) == 0xff020000 && a[1] == 0 && bpf_ntohl(a[2]) == 1 &&
	       (bpf_ntohl(a[3]) >> 24) == 0xff;
}

/* ICMPv6 types handled as neighbour discovery / multicast listener traffic. */
static __always_inline int icmp6_is_nd(__u8 type)
{
	return (type >= 130 && type <= 137) || type == 143;
}

static __always_inline int icmp6_is_mld(__u8 type)
{
	return (type >= 130 && type <= 132) || type == 143;
}

/* Anti-spoofing check for an IP packet leaving @ep (DHCP was handled before).
 * Returns 1 when the source address is acceptable, 0 when spoofed. */
static __always_inline int ep_source_ok(const struct endpoint_info *ep, const struct pkt *p)
{
	if (p->family == 4)
		return ep_owns_ip4(ep, p->saddr[0]);
	if (ep_owns_any_ip6(ep, p->saddr))
		return 1;
	/* the unspecified source: checked further by ep_check_nd (DAD, RS, MLD) */
	return ip6_is_unspecified(p->saddr) && p->proto == IPPROTO_ICMPV6_ &&
	       p->fragment == FRAG_NONE &&
	       (p->icmp_type == 133 || p->icmp_type == 135 || p->icmp_type == 131 ||
		p->icmp_type == 143);
}

/* Does ND/MLD packet @p stay on the link (see the header comment)? */
static __always_inline int nd_on_link(const struct endpoint_info *ep, const struct pkt *p,
				      int dir)
{
	int mld = icmp6_is_mld(p->icmp_type);

	if (p->hop_limit != (mld ? 1 : 255))
		return 0;
	if (ip6_is_multicast(p->daddr))
		return mld || ip6_is_link_multicast(p->daddr);
	if (ip6_is_link_local(p->daddr))
		return 1;
	if (mld || (p->icmp_type != 135 && p->icmp_type != 136))
		return 0;
	return dir == DIR_INGRESS ? ep_owns_ip6(ep, p->daddr) : ep_on_own_64(ep, p->daddr);
}

/* The target address of an NS or NA (bytes 8-23 of the ICMPv6 message). */
static __always_inline int nd_target(struct __sk_buff *skb, const struct pkt *p,
				     __u32 *target)
{
	return pkt_load_slow(skb, p->l4_off + 8, target, 16);
}

/* Neighbour discovery / MLD packet @p (not fragmented) of endpoint @ep in
 * direction @dir; the source passed ep_source_ok when @dir is DIR_EGRESS.
 * Returns REASON_NEIGH to forward, REASON_SPOOFED / REASON_INVALID to drop, or
 * REASON_NONE when it is not link traffic (conntrack and policy decide). */
static __always_inline int ep_check_nd(struct __sk_buff *skb, const struct endpoint_info *ep,
				       const struct pkt *p, int dir)
{
	__u32 target[4];
	int unspec = ip6_is_unspecified(p->saddr);

	if (dir == DIR_INGRESS) {
		if (!nd_on_link(ep, p, dir))
			return REASON_NONE;
		if ((p->icmp_type == 134 || p->icmp_type == 137) && !ip6_is_link_local(p->saddr))
			return REASON_NONE;
		return REASON_NEIGH;
	}
	if (p->icmp_type == 134 || p->icmp_type == 137)
		return REASON_SPOOFED;
	if (!nd_on_link(ep, p, dir))
		return unspec ? REASON_SPOOFED : REASON_NONE;
	if (p->icmp_type == 136) {
		if (nd_target(skb, p, target) < 0)
			return REASON_INVALID;
		if (unspec)
			return REASON_INVALID;
		return ep_owns_any_ip6(ep, target) ? REASON_NEIGH : REASON_SPOOFED;
	}
	if (p->icmp_type == 135 && unspec) {
		/* duplicate address detection: only for the endpoint's own addresses */
		if (nd_target(skb, p, target) < 0)
			return REASON_INVALID;
		if (!ip6_is_solicited_node(p->daddr))
			return REASON_INVALID;
		return ep_owns_any_ip6(ep, target) ? REASON_NEIGH : REASON_SPOOFED;
	}
	return REASON_NEIGH;  /* RS, NS, MLD: the (checked) source is the claim */
}

/* ND of an endpoint that is not identified yet (so that the host can reach it for
 * DHCPv6): on-link NS, NA and RS only, from a link-local or the unspecified source;
 * an NA may only claim its own source address. They go to the host only (the
 * caller delivers them with dhcp_deliver); toward the endpoint they pass only from
 * the host. Returns 1 when @p is such a packet. */
static __always_inline int ep_unidentified_nd_ok(struct __sk_buff *skb,
						 const struct endpoint_info *ep,
						 const struct pkt *p, int dir)
{
	__u32 target[4];
	__u8 t = p->icmp_type;

	if (p->family != 6 || p->proto != IPPROTO_ICMPV6_ || p->fragment != FRAG_NONE)
		return 0;
	if (t != 133 && t != 135 && t != 136 && !(dir == DIR_INGRESS && t == 134))
		return 0;
	if (p->hop_limit != 255)
		return 0;
	if (!ip6_is_link_local(p->daddr) && !ip6_is_link_multicast(p->daddr))
		return 0;
	if (dir == DIR_INGRESS)
		return ip6_is_link_local(p->saddr) || (t == 135 && ip6_is_unspecified(p->saddr));
	if (t == 136) {
		if (!ip6_is_link_local(p->saddr) || nd_target(skb, p, target) < 0)
			return 0;
		return target[0] == p->saddr[0] && target[1] == p->saddr[1] &&
		       target[2] == p->saddr[2] && target[3] == p->saddr[3];
	}
	return ip6_is_link_local(p->saddr) || ip6_is_unspecified(p->saddr);
}

/* ARP. Toward the endpoint everything passes; from the endpoint the sender
 * protocol address must be one of its IPv4 addresses (or 0.0.0.0, a probe).
 * @arp_spa: out, the claimed sender address (for events).
 * Returns REASON_NEIGH to forward, REASON_SPOOFED / REASON_INVALID to drop. */
static __always_inline int ep_check_arp(struct __sk_buff *skb, const struct endpoint_info *ep,
					int dir, __be32 *arp_spa, __be32 *arp_tpa)
{
	__u8 arp[28];

	if (pkt_load_slow(skb, ETH_HLEN_, arp, sizeof(arp)) < 0)
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

/* DHCP client message of an endpoint (identified or not) for the host's server:
 * v4 UDP 68 -> 67 to 255.255.255.255 from 0.0.0.0 or one of its addresses (discover,
 * request, rebinding), v6 UDP 546 -> 547 to ff02::1:2 from a link-local source.
 * Unicast renewals to a server's address are ordinary traffic (policy). */
static __always_inline int dhcp_is_client_msg(const struct endpoint_info *ep,
					      const struct pkt *p)
{
	if (p->proto != IPPROTO_UDP_ || p->fragment != FRAG_NONE || !p->has_ports)
		return 0;
	if (p->family == 4)
		return p->sport == bpf_htons(68) && p->dport == bpf_htons(67) &&
		       p->daddr[0] == 0xffffffff &&
		       (p->saddr[0] == 0 || ep_owns_ip4(ep, p->saddr[0]));
	return p->sport == bpf_htons(546) && p->dport == bpf_htons(547) &&
	       bpf_ntohl(p->daddr[0]) == 0xff020000 && p->daddr[1] == 0 && p->daddr[2] == 0 &&
	       bpf_ntohl(p->daddr[3]) == 0x00010002 && ip6_is_link_local(p->saddr);
}

/* A DHCP server reply toward an endpoint: v4 UDP 67 -> 68, v6 547 -> 546. */
static __always_inline int dhcp_is_server_msg(const struct pkt *p)
{
	if (p->proto != IPPROTO_UDP_ || p->fragment != FRAG_NONE || !p->has_ports)
		return 0;
	if (p->family == 4)
		return p->sport == bpf_htons(67) && p->dport == bpf_htons(68);
	return p->sport == bpf_htons(547) && p->dport == bpf_htons(546);
}

/* Did the packet now leaving toward an endpoint come from the host (sent by it, or
 * routed through it), rather than from another endpoint across the bridge? */
static __always_inline int from_host(struct __sk_buff *skb)
{
	__u32 iif = skb->ingress_ifindex;

	return iif == 0 || !endpoints.lookup(&iif);
}

/* Deliver a packet from @ep to the host only (ep->host_ifindex, see stockade_maps.h).
 * Returns the tc action, or -1 when the endpoint has no way to the host. */
static __always_inline int dhcp_deliver(struct __sk_buff *skb, const struct endpoint_info *ep)
{
	if (ep->host_ifindex == 0)
		return -1;
	if (ep->host_ifindex == skb->ifindex)
		return TC_ACT_OK;
	return bpf_redirect(ep->host_ifindex, BPF_F_INGRESS);
}

#endif
