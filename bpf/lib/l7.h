/* SPDX-License-Identifier: Apache-2.0 */
/*
 * L7 steering (docs/policy.md, "HTTP rules"). TCP segments a local endpoint sends to
 * an L7-enforced port of a local endpoint (the agent writes l7_ports, L7_SERVER), or
 * sends from such a port (the server's replies); and those a local endpoint with egress
 * HTTP rules (L7_CLIENT) sends to that port of any peer, or a local peer sends from
 * that port to it (the replies) go to the host's IP stack instead of
 * being bridged: skb->mark gets L7_MARK, the dst MAC becomes the host's on that
 * segment (l7_host, by the sender's ifindex) and the packet is redirected into the
 * ingress of the bridge device itself, not through the bridge: so it reaches the IP
 * stack once, without the bridge's netfilter pass (br_netfilter), which would run
 * TPROXY before ip_rcv drops the socket it chose. The host routes marked packets
 * to a local table; nft TPROXY hands them to the transparent proxy's listener
 * (a new connection) or to the proxy's own socket (its upstream connection, which
 * uses the client's address). Marked packets that no socket takes are dropped by nft:
 * a proxy that is down or not configured yet closes the port, never opens it.
 * A connection routed in from another host meets the server's own hook (towards the
 * endpoint): its packets to the L7 port are steered the same way there, once the
 * server's ingress policy admitted them; the host's own packets (the proxy's upstream
 * connections) are not.
 * This block runs only on packets the pipeline has already forwarded.
 */
#ifndef STOCKADE_LIB_L7_H
#define STOCKADE_LIB_L7_H

static __always_inline int l7_is_port(__u8 family, __u8 kind, const __u32 *addr, __be16 port,
				      __u32 cfg)
{
	struct l7_port_key k = {};

	if (cfg & (kind == L7_SERVER ? CFG_F_L7_NO_SERVERS : CFG_F_L7_NO_CLIENTS))
		return 0;

	k.family = family;
	k.kind = kind;
	k.port = port;
	if (family == 4)
		__builtin_memcpy(k.addr, addr, 4);
	else
		__builtin_memcpy(k.addr, addr, 16);
	return l7_ports.lookup(&k) != 0;
}

/* A client's SYN to an L7 port (the server's, or the client's egress one): the server's
 * L4 ingress policy decides first, as the server's own hook would, which steered packets
 * never reach. A peer it denies is dropped here, never answered by the proxy (a 403
 * would tell it the port is there). A server with no policy here (another host's, the
 * world) has no flags: not enforced, admitted; its own host decides.
 * Returns REASON_NONE or the drop reason. */
static __always_inline int l7_server_admits(const struct pkt *p, __u32 client, __u32 cfg)
{
	__u32 ids[2] = {};
	__u8 match = 0;

	if ((p->tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN || (cfg & CFG_F_AUDIT))
		return REASON_NONE;
	return policy_decide(ipcache_identity(p->family, p->daddr), client, DIR_INGRESS, p,
			     &match, ids);
}

/* @act: the pipeline's tc action for the packet; @local: the sender's identity.
 * Returns the final action. */
static __always_inline int l7_steer(struct __sk_buff *skb, int dir, const struct pkt *p, int act,
				    __u32 local, __u32 cfg)
{
	struct l7_host *host;
	__u32 ifindex = skb->ifindex;
	int out, reason;

	if (act != TC_ACT_OK || p->proto != IPPROTO_TCP_ || !p->has_ports ||
	    (cfg & (CFG_F_L7_NO_SERVERS | CFG_F_L7_NO_CLIENTS)) ==
	    (CFG_F_L7_NO_SERVERS | CFG_F_L7_NO_CLIENTS))
		return act;
	if (dir == DIR_INGRESS) {
		/* Routed here from another host: the server's ingress policy has just
		 * admitted it (a peer it denies was dropped, never answered). What the host
		 * sends itself carries its socket: the proxy's upstream connections (the
		 * host's own connections to L7 ports loop through the proxy, nft output). */
		if (skb->sk || !l7_is_port(p->family, L7_SERVER, p->daddr, p->dport, cfg))
			return act;
		out = 0;
	} else {
		out = l7_is_port(p->family, L7_SERVER, p->daddr, p->dport, cfg) ||
		      l7_is_port(p->family, L7_CLIENT, p->saddr, p->dport, cfg);
		if (!out && !l7_is_port(p->family, L7_SERVER, p->saddr, p->sport, cfg) &&
		    !l7_is_port(p->family, L7_CLIENT, p->daddr, p->sport, cfg))
			return act;
	}
	if (out) {
		reason = l7_server_admits(p, local, cfg);
		if (reason != REASON_NONE) {
			count(skb, dir, VERDICT_DROPPED, reason);
			return TC_ACT_SHOT;
		}
	}
	host = l7_host.lookup(&ifindex);
	if (!host)
		return TC_ACT_SHOT;  /* no way to the proxy: closed, not bridged past it */
	skb->mark = L7_MARK;
	if (bpf_skb_store_bytes(skb, 0, host->mac, 6, 0) < 0)
		return TC_ACT_SHOT;
	if (host->ifindex && host->ifindex != ifindex)
		return bpf_redirect(host->ifindex, BPF_F_INGRESS);
	return TC_ACT_OK;  /* routed interface: the host stack is right behind it */
}

#endif
