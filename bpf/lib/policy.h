/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Identity lookup (ipcache) and policy decision. The decision follows
 * stockade.policy.mapstate.lookup() exactly:
 *   1. (local identity, direction) not enforced        -> allow
 *   2. longest match for the exact peer, then for peer ANY (0)
 *   3. a deny from either lookup                        -> deny rule
 *   4. an allow from either lookup                      -> allow
 *   5. otherwise default_deny ? policy denied : allow
 */
#ifndef STOCKADE_LIB_POLICY_H
#define STOCKADE_LIB_POLICY_H

#define POLICY_PREFIX_FIXED 72  /* local + peer + direction */
#define POLICY_PREFIX_PROTO 80  /* ... + protocol */
#define POLICY_PREFIX_FULL  96  /* ... + port */

/* Identity of address @a (family 4 or 6, network order). Miss: world. */
static __always_inline __u32 ipcache_identity(__u8 family, const __u32 *a)
{
	struct ipcache_value *v;

	if (family == 4) {
		struct ipcache4_key k = { .prefixlen = 32 };
		__builtin_memcpy(k.addr, a, 4);
		v = ipcache4.lookup(&k);
	} else {
		struct ipcache6_key k = { .prefixlen = 128 };
		__builtin_memcpy(k.addr, a, 16);
		v = ipcache6.lookup(&k);
	}
	return v ? v->identity : IDENTITY_WORLD;
}

/* One LPM lookup among the entries of generation @gen (stockade_maps.h, "Policy
 * generations"). Returns -1 on miss, else the entry's deny flag (0/1); @id: out,
 * the entry's policy_id (which policies made it: flows name them as of that moment). */
static __always_inline int policy_match(__u32 local, __u32 peer, int dir, int gen,
					const struct pkt *p, __u32 *id)
{
	struct policy_key k = {};
	struct policy_value *v;

	k.local = local;
	k.peer = peer;
	k.direction = dir | (gen ? POLICY_DIR_GEN : 0);
	k.proto = p->proto;
	if (p->has_ports) {
		k.prefixlen = POLICY_PREFIX_FULL;
		/* ICMP: the type, in the port's place (network order like a port) */
		if (p->proto == IPPROTO_ICMP_ || p->proto == IPPROTO_ICMPV6_)
			k.port = bpf_htons(p->icmp_type);
		else
			k.port = p->dport;
	} else {
		/* Port unknown: only entries without port bits (port_plen 0) match. */
		k.prefixlen = POLICY_PREFIX_PROTO;
	}
	v = policy.lookup(&k);
	if (!v)
		return -1;
	*id = v->policy_id;
	return v->deny ? 1 : 0;
}

/* Decide packet @p between @local and @peer in direction @dir.
 * @match: out, MATCH_* | MATCH_F_* (how it was decided, for events).
 * @ids: out, the policy_id of the exact and the any-peer entry that matched (0: none).
 * Returns REASON_NONE (allow), REASON_POLICY_DENY_RULE or REASON_POLICY_DENIED. */
static __always_inline int policy_decide(__u32 local, __u32 peer, int dir,
					 const struct pkt *p, __u8 *match, __u32 *ids)
{
	struct policy_flags_key fk = {};
	struct policy_flags_value *f, flags;
	int exact, any = -1;

	fk.identity = local;
	fk.direction = dir;
	f = policy_flags.lookup(&fk);
	if (!f) {
		*match = MATCH_NOT_ENFORCED;
		return REASON_NONE;
	}
	/* The flags and the generation in force, as one state (not preallocated: a
	 * replaced entry stays as it was while we read it). */
	__builtin_memcpy(&flags, f, sizeof(flags));
	if (!flags.enforced) {
		*match = MATCH_NOT_ENFORCED;
		return REASON_NONE;
	}
	ids[0] = ids[1] = 0;
	exact = policy_match(local, peer, dir, flags.gen, p, &ids[0]);
	if (peer != IDENTITY_ANY)
		any = policy_match(local, IDENTITY_ANY, dir, flags.gen, p, &ids[1]);
	*match = (exact >= 0 ? MATCH_F_EXACT : 0) | (any >= 0 ? MATCH_F_ANY : 0);
	if (exact == 1 || any == 1) {
		*match |= MATCH_DENY;
		return REASON_POLICY_DENY_RULE;
	}
	if (exact == 0 || any == 0) {
		*match |= MATCH_ALLOW;
		return REASON_NONE;
	}
	if (flags.default_deny) {
		*match |= MATCH_DEFAULT_DENY;
		return REASON_POLICY_DENIED;
	}
	*match |= MATCH_DEFAULT_ALLOW;
	return REASON_NONE;
}

#endif
