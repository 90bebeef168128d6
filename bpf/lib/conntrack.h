/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking. Entries are keyed per hook (ifindex + direction of the
 * first packet), see stockade_maps.h. An entry whose deadline has passed is
 * treated as absent here and deleted by the agent's gc
 * (stockade.datapath.Datapath.ct_gc).
 *
 * Lifetimes: TCP SYN seen, no reply: CT_TIMEOUT_SYN_S; established:
 * CT_TIMEOUT_TCP_S; after FIN or RST from either side: CT_TIMEOUT_CLOSE_S (not
 * extended by later packets); other protocols: CT_TIMEOUT_OTHER_S, refreshed.
 */
#ifndef STOCKADE_LIB_CONNTRACK_H
#define STOCKADE_LIB_CONNTRACK_H

#define NSEC_PER_SEC 1000000000ULL

#define CT_MISS  0
#define CT_FWD   1  /* later packet in the original direction */
#define CT_REPLY 2  /* packet in the reply direction */

/* Build the conntrack key of packet @p seen at @ifindex in direction @dir.
 * With @reverse, build the key the packet's reply would have been created
 * under (addresses and ports swapped, other direction). */
static __always_inline void ct_key_build(struct ct_key *k, const struct pkt *p,
					 __u32 ifindex, int dir, int reverse)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->ifindex = ifindex;
	k->proto = p->proto;
	k->family = p->family;
	if (!reverse) {
		__builtin_memcpy(k->saddr, p->saddr, 16);
		__builtin_memcpy(k->daddr, p->daddr, 16);
		k->sport = p->sport;
		k->dport = p->dport;
		k->direction = dir;
	} else {
		__builtin_memcpy(k->saddr, p->daddr, 16);
		__builtin_memcpy(k->daddr, p->saddr, 16);
		k->sport = p->dport;
		k->dport = p->sport;
		k->direction = !dir;
	}
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
 * Returns CT_MISS, CT_FWD or CT_REPLY. */
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
		ct_key_build(&k, p, ifindex, dir, 1);
		v = conntrack.lookup(&k);
		if (!v || v->expires < now)
			return CT_MISS;
		ret = CT_REPLY;
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

/* Create the entry for the first packet @p of a flow allowed (or audited) at
 * (@ifindex, @dir). Returns 0, or -1 when the map refused the insert. */
static __always_inline int ct_create(const struct pkt *p, __u32 ifindex, int dir,
				     int audited)
{
	struct ct_key k;
	struct ct_value v = {};
	__u64 lifetime;

	ct_key_build(&k, p, ifindex, dir, 0);
	v.state = CT_STATE_NEW;
	ct_next(p->proto, p->tcp_flags, 0, &v.state, &lifetime);
	v.created = bpf_ktime_get_ns();
	v.expires = v.created + lifetime;
	v.audited = audited;
	if (conntrack.update(&k, &v) < 0)
		return -1;
	return 0;
}

#endif
