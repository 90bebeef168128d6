/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The per-packet pipeline shared by both entry points:
 *   endpoint lookup -> L2 (ARP) -> IP parse -> fragments -> DHCP -> anti-spoofing
 *   -> ND -> conntrack (ICMP errors via their quoted header) -> policy -> audit
 *   -> conntrack create -> counters / events.
 *
 * An endpoint that is not identified yet is closed (REASON_UNKNOWN_ENDPOINT), except
 * for its DHCP exchange with the host's server and the neighbour discovery that
 * needs (endpoint.h): so a VM that gets its address by DHCP can get a lease, and then
 * be identified by it.
 *
 * Audit mode (global config bit or endpoint flag) forwards packets that policy
 * would drop and counts them as AUDIT. It does NOT cover spoofed, invalid,
 * unsupported, orphan-fragment or unknown-endpoint drops: those are about packet
 * validity, not policy, and stay dropped.
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

static __always_inline int drop(struct __sk_buff *skb, int dir, int reason,
				const struct pkt *p, __u32 local)
{
	return finish(skb, dir, VERDICT_DROPPED, reason, p, local, 0, 0);
}

/* Handle one ARP packet for endpoint @ep. */
static __always_inline int handle_arp(struct __sk_buff *skb, const struct endpoint_info *ep,
				      int dir)
{
	struct pkt p = {};
	int reason = ep_check_arp(skb, ep, dir, &p.saddr[0], &p.daddr[0]);

	if (reason == REASON_NEIGH)
		return finish(skb, dir, VERDICT_FORWARDED, reason, &p, ep->identity, 0, 0);
	return drop(skb, dir, reason, &p, ep->identity);
}

/* Fragments: record what the first fragment carries; give a later fragment the
 * protocol and ports of its first fragment. Returns 0, or -1 for an orphan (a later
 * fragment whose first fragment was not seen). */
static __always_inline int handle_fragment(struct pkt *p)
{
	struct frag_key k = {};
	struct frag_value *v;

	if (p->fragment == FRAG_NONE)
		return 0;
	k.family = p->family;
	k.proto = p->frag_proto;
	k.id = p->frag_id;
	__builtin_memcpy(k.saddr, p->saddr, 16);
	__builtin_memcpy(k.daddr, p->daddr, 16);
	if (p->fragment == FRAG_FIRST) {
		struct frag_value nv = {
			.sport = p->sport, .dport = p->dport, .l4_proto = p->proto,
			.has_ports = p->has_ports, .icmp_type = p->icmp_type,
			.icmp_code = p->icmp_code,
		};

		frag.update(&k, &nv);
		return 0;
	}
	v = frag.lookup(&k);
	if (!v)
		return -1;
	p->proto = v->l4_proto;
	p->sport = v->sport;
	p->dport = v->dport;
	p->has_ports = v->has_ports;
	p->icmp_type = v->icmp_type;
	p->icmp_code = v->icmp_code;
	return 0;
}

/* DHCP and ND of an endpoint, both identified or not (endpoint.h).
 * Returns the tc action when the packet was handled, -1 to go on. */
static __always_inline int handle_dhcp(struct __sk_buff *skb, const struct endpoint_info *ep,
				       int dir, struct pkt *p)
{
	__u32 local = ep->identity;
	int act;

	if (dir == DIR_EGRESS) {
		if (!dhcp_is_client_msg(ep, p))
			return -1;
		act = dhcp_deliver(skb, ep);
		if (act < 0)
			return drop(skb, dir, REASON_UNKNOWN_ENDPOINT, p, local);
		count(skb, dir, VERDICT_FORWARDED, REASON_DHCP);
		return act;
	}
	if (!dhcp_is_server_msg(p) || !from_host(skb))
		return -1;
	if (!(ep->flags & EP_F_UNIDENTIFIED)) {
		/* a reply flooded across the bridge for another client's MAC */
		__u8 dst[6];
		__u8 known = 0, same = 1;

		if (pkt_load_slow(skb, 0, dst, 6) < 0)
			return -1;
#pragma unroll
		for (int i = 0; i < 6; i++) {
			known |= ep->mac[i];
			same &= dst[i] == ep->mac[i];
		}
		if (known && !same && !(dst[0] & 1))
			return -1;
	}
	count(skb, dir, VERDICT_FORWARDED, REASON_DHCP);
	return TC_ACT_OK;
}

/* An endpoint that is not identified yet: DHCP and the ND it needs, with the
 * host only; everything else dropped. @p is parsed (L3 and L4). */
static __always_inline int handle_unidentified(struct __sk_buff *skb,
					       const struct endpoint_info *ep, int dir,
					       struct pkt *p)
{
	int act = handle_dhcp(skb, ep, dir, p);

	if (act >= 0)
		return act;
	if (ep_unidentified_nd_ok(skb, ep, p, dir)) {
		if (dir == DIR_INGRESS) {
			if (from_host(skb))
				return finish(skb, dir, VERDICT_FORWARDED, REASON_NEIGH, p, 0, 0, 0);
		} else {
			act = dhcp_deliver(skb, ep);
			if (act >= 0) {
				count(skb, dir, VERDICT_FORWARDED, REASON_NEIGH);
				return act;
			}
		}
	}
	return drop(skb, dir, REASON_UNKNOWN_ENDPOINT, p, 0);
}

/* Handle one IPv4/IPv6 packet (parsed into @p, L4 included) for endpoint @ep. */
static __always_inline int handle_ip(struct __sk_buff *skb, const struct endpoint_info *ep,
				     int dir, struct pkt *p, __u32 cfg)
{
	__u32 local = ep->identity;
	__u32 peer;
	int reason, verdict = VERDICT_FORWARDED;
	int audit, icmp_error;

	reason = handle_dhcp(skb, ep, dir, p);
	if (reason >= 0)
		return reason;
	if (dir == DIR_EGRESS && !ep_source_ok(ep, p))
		return drop(skb, dir, REASON_SPOOFED, p, local);
	if (p->family == 6 && p->proto == IPPROTO_ICMPV6_ && p->fragment == FRAG_NONE &&
	    icmp6_is_nd(p->icmp_type)) {
		reason = ep_check_nd(skb, ep, p, dir);
		if (reason == REASON_NEIGH)
			return finish(skb, dir, VERDICT_FORWARDED, reason, p, local, 0, 0);
		if (reason != REASON_NONE)
			return drop(skb, dir, reason, p, local);
	}

	/* ICMP errors pass when the packet they quote belongs to a tracked flow. The
	 * quoted packet travelled the other way through this same hook. */
	icmp_error = proto_is_icmp(p->proto) && p->fragment == FRAG_NONE &&
		     icmp_is_error(p->family, p->icmp_type);
	if (icmp_error) {
		struct pkt inner = {};

		if (parse_icmp_inner(skb, p, &inner) == 0 && inner.family == p->family) {
			int ct = ct_lookup(&inner, skb->ifindex, !dir, 0);

			if (ct == CT_FWD || ct == CT_REPLY)
				return finish(skb, dir, VERDICT_FORWARDED, REASON_CT_RELATED, p,
					      local, 0, 0);
		}
	} else {
		int ct = ct_lookup(p, skb->ifindex, dir, 1);

		if (ct == CT_REVOKED) {
			peer = ipcache_identity(p->family, dir == DIR_EGRESS ? p->daddr : p->saddr);
			return finish(skb, dir, VERDICT_DROPPED, REASON_POLICY_DENIED, p, local,
				      peer, 1);
		}
		if (ct != CT_MISS)
			return finish(skb, dir, VERDICT_FORWARDED, REASON_CT_ESTABLISHED, p,
				      local, 0, 0);
	}

	/* New flow: policy between the endpoint and the peer's identity. */
	peer = ipcache_identity(p->family, dir == DIR_EGRESS ? p->daddr : p->saddr);
	reason = policy_decide(local, peer, dir, p, &p->match, p->policy_ids);
	audit = 0;
	if (reason != REASON_NONE) {
		if ((cfg & CFG_F_AUDIT) || (ep->flags & EP_F_AUDIT)) {
			verdict = VERDICT_AUDIT;
			audit = 1;
		} else {
			return finish(skb, dir, VERDICT_DROPPED, reason, p, local, peer, 1);
		}
	}
	/* An error is a one-off: it opens nothing. */
	if (!icmp_error && ct_create(p, skb->ifindex, dir, audit, peer) < 0)
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
	__u32 local;
	int unidentified, bad;

	ep = endpoints.lookup(&ifindex);
	unidentified = !ep || (ep->flags & EP_F_UNIDENTIFIED);
	if (unidentified && (cfg & CFG_F_FORWARD_UNIDENTIFIED))
		return finish(skb, dir, VERDICT_FORWARDED, REASON_UNKNOWN_ENDPOINT, &p, 0, 0, 0);
	if (!ep)
		return drop(skb, dir, REASON_UNKNOWN_ENDPOINT, &p, 0);
	local = unidentified ? 0 : ep->identity;
	bad = unidentified ? REASON_UNKNOWN_ENDPOINT : REASON_INVALID;
	/* A VLAN tag taken out of the frame into skb metadata: not ours to forward. */
	if (skb->vlan_present)
		return drop(skb, dir, unidentified ? bad : REASON_UNSUPPORTED, &p, local);
	if (pkt_load(skb, 12, &proto, 2) < 0)
		return drop(skb, dir, bad, &p, local);
	proto = bpf_ntohs(proto);
	if (proto == ETHERTYPE_ARP) {
		if (unidentified)
			return drop(skb, dir, REASON_UNKNOWN_ENDPOINT, &p, 0);
		return handle_arp(skb, ep, dir);
	}
	if (proto == ETHERTYPE_IP) {
		if (parse_ipv4(skb, ETH_HLEN_, &p, 0) < 0)
			return drop(skb, dir, bad, &p, local);
	} else if (proto == ETHERTYPE_IPV6) {
		if (parse_ipv6(skb, ETH_HLEN_, &p, 1) < 0)
			return drop(skb, dir, bad, &p, local);
	} else {
		return drop(skb, dir, unidentified ? bad : REASON_UNSUPPORTED, &p, local);
	}
	if (parse_l4(skb, &p, 0) < 0)
		return drop(skb, dir, bad, &p, local);
	if (unidentified)
		return handle_unidentified(skb, ep, dir, &p);
	if (handle_fragment(&p) < 0)
		return drop(skb, dir, REASON_FRAGMENT_ORPHAN, &p, local);
	return l7_steer(skb, dir, &p, handle_ip(skb, ep, dir, &p, cfg), local, cfg);
}

#endif
