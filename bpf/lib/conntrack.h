/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking. Entries are keyed per hook (ifindex + direction of the
 * first packet), see stockade_maps.h. An entry whose deadline has passed is
 * treated as absent here and deleted by the agent's gc
 * (stockade.datapath.Datapath.ct_gc).
 *
 * The map is a plain hash: nothing is ever evicted to make room. Each owner (an
 * endpoint for the flows it opens; an endpoint and one peer identity for flows
 * opened toward it, see struct ct_owner) has a budget of CT_ENDPOINT_MAX entries,
 * enforced once the table holds CT_PRESSURE_ENTRIES: a workload opening flows can
 * take the room nobody else needs, but never the last part of the table, which
 * stays for owners within their budget. A new flow refused (budget spent under
 * pressure, or the map full) is dropped and counted as REASON_CT_FULL, while the
 * flows already tracked keep passing.
 *
 * Lifetimes: TCP SYN seen, no reply: CT_TIMEOUT_SYN_S; established:
 * CT_TIMEOUT_TCP_S; after FIN or RST from either side: CT_TIMEOUT_CLOSE_S (not
 * extended by later packets); other protocols: CT_TIMEOUT_OTHER_S, refreshed.
 *
 * Revoked: when a policy change denies a tracked flow, the agent marks its entry
 * CT_STATE_REVOKED rather than deleting it. A packet of the flow from either side is
 * dropped and keeps the entry alive (TCP: CT_TIMEOUT_TCP_S). Deleting it would not
 * stop the flow: any packet without an entry may start one, so the endpoint's next
 * ACK would create an entry from its side, and the peer's packets would then pass
 * as its replies.
 */
#ifndef STOCKADE_LIB_CONNTRACK_H
#define STOCKADE_LIB_CONNTRACK_H

#define NSEC_PER_SEC 1000000000ULL

#define CT_MISS  0
#define CT_FWD   1  /* later packet in the original direction */
#define CT_REPLY 2  /* packet in the reply direction */
#define CT_REVOKED 3 /* either direction of a flow the agent revoked: dropped */

/* Build the conntrack key of packet @p seen at @ifindex in direction @dir.
 * With @reverse, build the key the packet's reply would have been created
 * under (addresses and ports swapped, other direction; ICMP: the request type of
 * the reply type p->icmp_type, which the caller checked with ct_has_reverse). */
static __always_inline void ct_key_build(struct ct_key *k, const struct pkt *p,
					 __u32 ifindex, int dir, int reverse)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->ifindex = ifindex;
	k->proto = p->proto;
	k->family = p->family;
	k->direction = reverse ? !dir : dir;
	if (!reverse) {
		__builtin_memcpy(k->saddr, p->saddr, 16);
		__builtin_memcpy(k->daddr, p->daddr, 16);
	} else {
		__builtin_memcpy(k->saddr, p->daddr, 16);
		__builtin_memcpy(k->daddr, p->saddr, 16);
	}
	if (proto_is_icmp(p->proto)) {
		k->sport = p->sport;   /* identifier of a query, else 0 */
		k->icmp_type = reverse ? icmp_request_of(p->family, p->icmp_type) : p->icmp_type;
	} else if (!reverse) {
		k->sport = p->sport;
		k->dport = p->dport;
	} else {
		k->sport = p->dport;
		k->dport = p->sport;
	}
}

/* Can packet @p be the reply of a tracked flow? Every non-ICMP packet can; an
 * ICMP packet only when it is the reply type of a query (echo reply...). */
static __always_inline int ct_has_reverse(const struct pkt *p)
{
	if (!proto_is_icmp(p->proto))
		return 1;
	return icmp_request_of(p->family, p->icmp_type) >= 0;
}

/* Lifetime in ns and state for an entry after seeing a packet with
 * @tcp_flags (TCP only) in state @state. */
static __always_inline void ct_next(__u8 proto, __u8 tcp_flags, int is_reply,
				    __u8 *state, __u64 *lifetime)
{
	if (proto != IPPROTO_TCP_) {
		*lifetime = CT_TIMEOUT_OTHER_S * NSEC_PER_SEC;
		return;
	}
	if (tcp_flags & (TCP_FIN | TCP_RST))
		*state = CT_STATE_CLOSING;
	else if (*state == CT_STATE_NEW && (is_reply || !(tcp_flags & TCP_SYN)))
		*state = CT_STATE_ESTABLISHED;
	if (*state == CT_STATE_CLOSING)
		*lifetime = CT_TIMEOUT_CLOSE_S * NSEC_PER_SEC;
	else if (*state == CT_STATE_ESTABLISHED)
		*lifetime = CT_TIMEOUT_TCP_S * NSEC_PER_SEC;
	else
		*lifetime = CT_TIMEOUT_SYN_S * NSEC_PER_SEC;
}

/* Look up packet @p at (@ifindex, @dir): first as a later packet of a flow it
 * started, then as a reply. Refreshes the entry when @update is set.
 * Returns CT_MISS, CT_FWD, CT_REPLY or CT_REVOKED. */
static __always_inline int ct_lookup(const struct pkt *p, __u32 ifindex, int dir,
				     int update)
{
	struct ct_key k;
	struct ct_value *v;
	__u64 now = bpf_ktime_get_ns();
	int ret = CT_FWD;

	ct_key_build(&k, p, ifindex, dir, 0);
	v = conntrack.lookup(&k);
	if (!v || v->expires < now) {
		if (!ct_has_reverse(p))
			return CT_MISS;
		ct_key_build(&k, p, ifindex, dir, 1);
		v = conntrack.lookup(&k);
		if (!v || v->expires < now)
			return CT_MISS;
		ret = CT_REPLY;
	}
	if (v->state == CT_STATE_REVOKED) {
		if (update)
			v->expires = now + (p->proto == IPPROTO_TCP_ ? CT_TIMEOUT_TCP_S :
					    CT_TIMEOUT_OTHER_S) * NSEC_PER_SEC;
		return CT_REVOKED;
	}
	if (update) {
		__u8 state = v->state;
		__u64 lifetime;
		__u8 was_closing = state == CT_STATE_CLOSING;

		ct_next(p->proto, p->tcp_flags, ret == CT_REPLY, &state, &lifetime);
		if (!was_closing)
			v->expires = now + lifetime;
		v->state = state;
	}
	return ret;
}

/* The created-entries counter of owner @o, made on first use.
 * Returns NULL when the owners map is full (the caller fails closed). */
static __always_inline struct ct_count *ct_owner_counter(struct ct_owner *o)
{
	struct ct_count zero = {};
	struct ct_count *c = ct_created.lookup(o);

	if (c)
		return c;
	ct_created.insert(o, &zero);   /* -EEXIST: another CPU made it first */
	return ct_created.lookup(o);
}

/* Live entries of owner @o whose created-counter is @created. */
static __always_inline __s64 ct_owner_live(struct ct_owner *o, struct ct_count *created)
{
	struct ct_count *released = ct_released.lookup(o);

	return (__s64)(released ? created->n - released->n : created->n);
}

/* Create the entry for the first packet @p of a flow allowed (or audited) at
 * (@ifindex, @dir), opened by identity @peer (see struct ct_owner). An expired
 * entry under the same key is reused in place (it is counted already). An owner
 * past its budget may still add entries while the whole table holds fewer than
 * CT_PRESSURE_ENTRIES (a busy server is not capped while there is room).
 * Returns 0, or -1 when the owner's budget is spent under pressure or a map is
 * full. */
static __always_inline int ct_create(const struct pkt *p, __u32 ifindex, int dir,
				     int audited, __u32 peer)
{
	struct ct_key k;
	struct ct_value v = {};
	struct ct_value *old;
	struct ct_owner o = { .ifindex = ifindex, .direction = dir };
	struct ct_owner all = {};      /* ifindex 0: the whole table */
	struct ct_count *created, *total;
	__u64 lifetime;

	ct_key_build(&k, p, ifindex, dir, 0);
	v.state = CT_STATE_NEW;
	ct_next(p->proto, p->tcp_flags, 0, &v.state, &lifetime);
	v.created = bpf_ktime_get_ns();
	v.expires = v.created + lifetime;
	v.audited = audited;
	old = conntrack.lookup(&k);
	if (old) {
		v.owner_peer = old->owner_peer;
		__builtin_memcpy(old, &v, sizeof(v));
		return 0;
	}
	o.peer = dir == DIR_INGRESS ? peer : 0;
	v.owner_peer = o.peer;
	created = ct_owner_counter(&o);
	total = ct_owner_counter(&all);
	if (!created || !total)
		return -1;
	if (ct_owner_live(&o, created) >= CT_ENDPOINT_MAX &&
	    ct_owner_live(&all, total) >= CT_PRESSURE_ENTRIES)
		return -1;
	if (conntrack.insert(&k, &v) < 0) {
		/* -EEXIST: another CPU created it meanwhile (counted there); else full */
		return conntrack.lookup(&k) ? 0 : -1;
	}
	__sync_fetch_and_add(&created->n, 1);
	__sync_fetch_and_add(&total->n, 1);
	return 0;
}

#endif
