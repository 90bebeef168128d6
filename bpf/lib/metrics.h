/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Counters and flow events.
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

/* Emit one flow event. Best effort: a full ring buffer loses the event. */
static __always_inline void emit_event(struct __sk_buff *skb, int dir, int verdict,
				       int reason, const struct pkt *p, __u32 local,
				       __u32 peer, int is_reply)
{
	struct flow_event ev = {};

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
	ev.tcp_flags = p->tcp_flags;
	ev.is_reply = is_reply;
	events.ringbuf_output(&ev, sizeof(ev), 0);
}

#endif
