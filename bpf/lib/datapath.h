/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The per-packet pipeline shared by both entry points:
 *   endpoint lookup -> L2 (ARP) -> IP parse -> anti-spoofing -> ND
 *   -> conntrack (ICMP errors via their quoted header) -> policy -> audit
 *   -> conntrack create -> counters / events.
 *
 * Audit mode (global config bit or endpoint flag) forwards packets that policy
 * would drop and counts them as AUDIT. It does NOT cover spoofed, invalid,
 * unsupported or unknown-endpoint drops: those are about packet validity, not
 * policy, and stay dropped.
 */
#ifndef STOCKADE_LIB_DATAPATH_H
#define STOCKADE_LIB_DATAPATH_H

static __always_inline __u32 config_flags(void)
{
	__u32 zero = 0;
	struct config_value *c = config.lookup(&zero);

	return c ? c->flags : 0;
}

/* Count one decision, and report it when @event is set (new connections) or it
 * is a drop; reports are rate limited, counters never are. Returns the tc action. */
static __always_inline int finish(struct __sk_buff *skb, int dir, int verdict, int reason,
				  const struct pkt *p, __u32 local, __u32 peer, int event)
{
	count(skb, dir, verdict, reason);
	if (event || verdict == VERDICT_DROPPED)
		emit_event(skb, dir, verdict, reason, p, local, peer, 0);
	return verdict == VERDICT_DROPPED ? TC_ACT_SHOT : TC_ACT_OK;
}

/* Handle one ARP packet for endpoint @ep. */
static __always_inline int handle_arp(struct __sk_buff *skb, const struct endpoint_info *ep,
				      int dir)
{
	struct pkt p = {};
	int reason = ep_check_arp(skb, ep, dir, &p.saddr[0], &p.daddr[0]);

	if (reason == REASON_NEIGH)
		return finish(skb, dir, VERDICT_FORWARDED, reason, &p, ep->identity, 0, 0);
	return finish(skb, dir, VERDICT_DROPPED, reason, &p, ep->identity, 0, 0);
}

/* Handle one IPv4/IPv6 packet (already parsed into @p) for endpoint @ep. */
static __always_inline int handle_ip(struct __sk_buff *skb, const struct endpoint_info *ep,
				     int dir, struct pkt *p, __u32 cfg)
{
	__u32 local = ep->identity;
	__u32 peer;
	int reason, verdict = VERDICT_FORWARDED;
	int audit;

	if (parse_l4(skb, p, 0) < 0)
		return finish(skb, dir, VERDICT_DROPPED, REASON_INVALID, p, local, 0, 0);
	if (dir == DIR_EGRESS && !ep_source_ok(ep, p))
		return finish(skb, dir, VERDICT_DROPPED, REASON_SPOOFED, p, local, 0, 0);
	if (p->family == 6 && p->proto == IPPROTO_ICMPV6_ && !p->fragment &&
	    icmp6_is_nd(p->icmp_type)) {
		reason = dir == DIR_EGRESS ? ep_check_nd_out(skb, ep, p) : REASON_NEIGH;
		verdict = reason == REASON_NEIGH ? VERDICT_FORWARDED : VERDICT_DROPPED;
		return finish(skb, dir, verdict, reason, p, local, 0, 0);
	}

	/* ICMP errors pass when the packet they quote belongs to a tracked flow. The
	 * quoted packet travelled the other way through this same hook. */
	if ((p->proto == IPPROTO_ICMP_ || p->proto == IPPROTO_ICMPV6_) && !p->fragment &&
	    icmp_is_error(p->family, p->icmp_type)) {
		struct pkt inner = {};

		if (parse_icmp_inner(skb, p, &inner) == 0 && inner.family == p->family &&
		    ct_lookup(&inner, skb->ifindex, !dir, 0) != CT_MISS)
			return finish(skb, dir, VERDICT_FORWARDED, REASON_CT_RELATED, p, local, 0, 0);
	} else if (ct_lookup(p, skb->ifindex, dir, 1) != CT_MISS) {
		return finish(skb, dir, VERDICT_FORWARDED, REASON_CT_ESTABLISHED, p, local, 0, 0);
	}

	/* New flow: policy between the endpoint and the peer's identity. */
	peer = ipcache_identity(p->family, dir == DIR_EGRESS ? p->daddr : p->saddr);
	reason = policy_decide(local, peer, dir, p, &p->match);
	audit = 0;
	if (reason != REASON_NONE) {
		if ((cfg & CFG_F_AUDIT) || (ep->flags & EP_F_AUDIT)) {
			verdict = VERDICT_AUDIT;
			audit = 1;
		} else {
			return finish(skb, dir, VERDICT_DROPPED, reason, p, local, peer, 1);
		}
	}
	if (ct_create(p, skb->ifindex, dir, audit) < 0)
		return finish(skb, dir, VERDICT_DROPPED, REASON_CT_FULL, p, local, peer, 1);
	return finish(skb, dir, verdict, reason, p, local, peer, 1);
}

/* Entry logic for both hooks. @dir: DIR_EGRESS for packets the endpoint sends
 * (tc ingress of the host-side interface), DIR_INGRESS for packets to it. */
static __always_inline int handle(struct __sk_buff *skb, int dir)
{
	struct endpoint_info *ep;
	__u32 ifindex = skb->ifindex;
	__u32 cfg = config_flags();
	struct pkt p = {};
	__u16 proto;

	ep = endpoints.lookup(&ifindex);
	if (!ep || (ep->flags & EP_F_UNIDENTIFIED)) {
		if (cfg & CFG_F_FORWARD_UNIDENTIFIED)
			return finish(skb, dir, VERDICT_FORWARDED, REASON_UNKNOWN_ENDPOINT, &p, 0, 0, 0);
		return finish(skb, dir, VERDICT_DROPPED, REASON_UNKNOWN_ENDPOINT, &p, 0, 0, 0);
	}
	if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
		return finish(skb, dir, VERDICT_DROPPED, REASON_INVALID, &p, ep->identity, 0, 0);
	proto = bpf_ntohs(proto);
	if (proto == ETHERTYPE_ARP)
		return handle_arp(skb, ep, dir);
	if (proto == ETHERTYPE_IP) {
		if (parse_ipv4(skb, ETH_HLEN_, &p) < 0)
			return finish(skb, dir, VERDICT_DROPPED, REASON_INVALID, &p, ep->identity, 0, 0);
	} else if (proto == ETHERTYPE_IPV6) {
		if (parse_ipv6(skb, ETH_HLEN_, &p, 1) < 0)
			return finish(skb, dir, VERDICT_DROPPED, REASON_INVALID, &p, ep->identity, 0, 0);
	} else {
		return finish(skb, dir, VERDICT_DROPPED, REASON_UNSUPPORTED, &p, ep->identity, 0, 0);
	}
	return handle_ip(skb, ep, dir, &p, cfg);
}

#endif
