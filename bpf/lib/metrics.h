/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Counters and flow events. Counters are exact; events are best effort and
 * rate limited per CPU (see event_buckets in stockade_maps.h).
 */
#ifndef STOCKADE_LIB_METRICS_H
#define STOCKADE_LIB_METRICS_H

/* Add @skb to the per-CPU counter of (@dir, @verdict, @reason). */
static __always_inline void count(struct __sk_buff *skb, int dir, int verdict, int reason)
{
	__u32 idx = COUNTER_INDEX(dir, verdict, reason);
	struct counter_value *c = counters.lookup(&idx);

	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	}
}

static __always_inline void count_lost(__u32 idx)
{
	__u64 *n = events_lost.lookup(&idx);

	if (n)
		*n += 1;
}

/* Take one event from this CPU's bucket of class @cls (EVENT_CLASS_*).
 * Returns 1 when the event may be sent, 0 when over budget. */
static __always_inline int event_budget(__u32 cls)
{
	struct event_bucket *b = event_buckets.lookup(&cls);
	__u64 now, cost, cap, t, elapsed;

	if (!b)
		return 0;
	cost = cls == EVENT_CLASS_DROP ? NSEC_PER_SEC / EVENTS_DROP_RATE
				       : NSEC_PER_SEC / EVENTS_NEW_RATE;
	cap = cls == EVENT_CLASS_DROP ? cost * EVENTS_DROP_BURST : cost * EVENTS_NEW_BURST;
	now = bpf_ktime_get_ns();
	elapsed = now - b->last;
	t = elapsed >= cap ? cap : b->tokens + elapsed;
	if (t > cap)
		t = cap;
	b->last = now;
	if (t < cost) {
		b->tokens = t;
		return 0;
	}
	b->tokens = t - cost;
	return 1;
}

/* Emit one flow event, within the rate limit of its class; events over the limit
 * or refused by a full ring buffer are counted in events_lost. */
static __always_inline void emit_event(struct __sk_buff *skb, int dir, int verdict,
				       int reason, const struct pkt *p, __u32 local,
				       __u32 peer, int is_reply)
{
	struct flow_event ev = {};
	__u32 cls = verdict == VERDICT_DROPPED ? EVENT_CLASS_DROP : EVENT_CLASS_NEW;

	if (!event_budget(cls)) {
		count_lost(cls == EVENT_CLASS_DROP ? EVENTS_LOST_RATE_DROP : EVENTS_LOST_RATE_NEW);
		return;
	}

	ev.timestamp = bpf_ktime_get_ns();
	ev.ifindex = skb->ifindex;
	ev.direction = dir;
	ev.verdict = verdict;
	ev.reason = reason;
	ev.src_identity = dir == DIR_EGRESS ? local : peer;
	ev.dst_identity = dir == DIR_EGRESS ? peer : local;
	ev.ip_version = p->family;
	__builtin_memcpy(ev.saddr, p->saddr, 16);
	__builtin_memcpy(ev.daddr, p->daddr, 16);
	ev.proto = p->proto;
	if (p->proto == IPPROTO_ICMP_ || p->proto == IPPROTO_ICMPV6_) {
		ev.icmp_type = p->icmp_type;
	} else {
		ev.sport = bpf_ntohs(p->sport);
		ev.dport = bpf_ntohs(p->dport);
	}
	ev.icmp_code = p->icmp_code;
	ev.tcp_flags = p->tcp_flags;
	ev.is_reply = is_reply;
	ev.pkt_len = skb->len;
	ev.policy_match = p->match;
	ev.policy_exact = p->policy_ids[0];
	ev.policy_any = p->policy_ids[1];
	if (events.ringbuf_output(&ev, sizeof(ev), 0) < 0)
		count_lost(EVENTS_LOST_RINGBUF);
}

#endif
