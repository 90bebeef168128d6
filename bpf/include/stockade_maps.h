/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Stockade datapath: map layouts shared by the BPF program and by
 * agent/stockade/datapath/maps.py (ctypes mirror; tests/root/test_datapath_layout.py
 * compares sizes and offsets of both through bcc).
 *
 * Byte order
 * ----------
 * Everything is HOST order unless the field name or type says otherwise:
 *   - identities, endpoint ids, ifindexes, flags, counters, timestamps: host order.
 *   - IP addresses (ip4 / ip6 / ipcache keys / ct addresses / event addresses):
 *     NETWORK order, exactly the bytes found in the packet.
 *   - policy_key.port (__be16): NETWORK order, so that an LPM prefix over the
 *     port bits selects the high bits of the port number first.
 *   - ct_key ports: NETWORK order (copied from the packet).
 *   - flow_event ports: HOST order (ready for display).
 *
 * Policy key (mirrors stockade.policy.mapstate.Key)
 * -------------------------------------------------
 *   [prefixlen u32][local u32][peer u32][direction u8][proto u8][port __be16]
 *   direction: bit 0 the direction, bit 7 (POLICY_DIR_GEN) the generation of the
 *   entry (v2). The LPM trie matches the data bytes in order. The prefix always covers local,
 *   peer and direction (72 bits, exact), then the protocol when it is not "any"
 *   (8 bits), then the top port_plen bits of port. A lookup uses prefixlen 96 when
 *   the packet has ports (TCP/UDP/SCTP; ICMP type stored in port) and 80 when it has
 *   none (other protocols; a later fragment has the ports of its first fragment,
 *   see frag): then only entries with port_plen 0
 *   can match.
 *
 * Policy generations (double buffer)
 * ----------------------------------
 *   Each (local identity, direction) has two generations of entries, 0 and 1; its
 *   policy_flags value says which one is in force (gen; no flags entry: generation
 *   0, not enforced). A lookup only sees entries of that generation. A large change
 *   writes the pair's whole new state into the other generation, then replaces the
 *   flags entry (new flags and generation: one map update), then deletes the old
 *   generation's entries: a packet meets the old state or the new one, never a mix
 *   (stockade.datapath.writer). Entries of the generation not in force are ignored.
 *
 * Conntrack key
 * -------------
 *   One entry per (ifindex, original direction, tuple of the first packet). Each
 *   hook (an endpoint's ingress or egress) keeps its own entries, so that a packet
 *   between two local endpoints is checked by both the sender's egress policy and
 *   the receiver's ingress policy. A reply is the reversed tuple seen at the same
 *   ifindex in the other direction. ICMP: the type of the first packet is in the key
 *   (icmp_type), the identifier of query messages (echo, timestamp...) in sport,
 *   dport 0; only the reply type of a query (echo reply to echo request) matches
 *   as a reply.
 *
 * Layout versions
 * ---------------
 *   A pinned map whose key or value layout (or meaning) changes gets a new layout
 *   version; version N > 1 is pinned as "<name>_vN" (version 1 has no suffix).
 *   stockade.datapath.pins.LAYOUT_VERSIONS lists them; stockade.datapath.migrate
 *   copies the entries of an older version's pin into the new map and removes the
 *   old pin. Versions of this header:
 *     endpoints    v2: host_ifindex, link-local addresses (ll[])
 *     conntrack    v2: icmp_type in the key, echo id in sport only; plain hash;
 *                  owner_peer in the value (budgets)
 *     counters     v2: reasons fragment_orphan and dhcp (NUM_REASONS 13)
 *     policy       v2: generation bit in policy_key.direction (POLICY_DIR_GEN)
 *     policy_flags v2: gen in the value (the generation in force)
 *     ct_created, ct_released, frag: v1 (new in this version of the header)
 */
#ifndef STOCKADE_MAPS_H
#define STOCKADE_MAPS_H

/* Directions, as in mapstate (INGRESS 0, EGRESS 1) from the endpoint's view. */
#define DIR_INGRESS 0
#define DIR_EGRESS  1

/* Verdicts */
#define VERDICT_FORWARDED 0
#define VERDICT_DROPPED   1
#define VERDICT_AUDIT     2
#define NUM_VERDICTS      3

/* Reasons (mirrored by stockade.datapath.maps.Reason). 0 for plain forwards. */
#define REASON_NONE             0 /* forwarded: allowed or not enforced */
#define REASON_POLICY_DENIED    1 /* enforced, default deny, no entry matched */
#define REASON_POLICY_DENY_RULE 2 /* a deny entry matched */
#define REASON_SPOOFED          3 /* source address (IP/ARP/ND) is not the endpoint's */
#define REASON_CT_FULL          4 /* conntrack insert failed */
#define REASON_UNKNOWN_ENDPOINT 5 /* no endpoints entry, or not yet identified */
#define REASON_INVALID          6 /* truncated or malformed headers */
#define REASON_UNSUPPORTED      7 /* ethertype / ND message we do not forward */
#define REASON_CT_ESTABLISHED   8 /* forwarded: later packet or reply of a tracked flow */
#define REASON_CT_RELATED       9 /* forwarded: ICMP error for a known flow */
#define REASON_NEIGH            10 /* forwarded: ARP / neighbour discovery */
#define REASON_FRAGMENT_ORPHAN  11 /* a later IP fragment whose first fragment was not seen */
#define REASON_DHCP             12 /* forwarded: DHCP client -> host server, or its reply */
#define NUM_REASONS             13

#define COUNTER_INDEX(dir, verdict, reason) \
	(((dir) * NUM_VERDICTS + (verdict)) * NUM_REASONS + (reason))
#define NUM_COUNTERS (2 * NUM_VERDICTS * NUM_REASONS)

/* Reserved identities */
#define IDENTITY_ANY   0
#define IDENTITY_WORLD 2

/* endpoint_info.flags */
#define EP_F_AUDIT        (1U << 0)
#define EP_F_UNIDENTIFIED (1U << 1)

/* config_value.flags */
#define CFG_F_AUDIT                (1U << 0)
#define CFG_F_FORWARD_UNIDENTIFIED (1U << 1)
/* No l7_ports entry of kind L7_SERVER (L7_CLIENT) exists: the programs skip those
 * lookups (lib/l7.h). A "none" bit rather than a "present" one, so that a config that
 * was never written (zero, or one an older build wrote) means "look", never "skip".
 * The agent clears the bit before it writes the kind's first entry and sets it only
 * after it removed the last one (datapath.l7maps). */
#define CFG_F_L7_NO_SERVERS        (1U << 2)
#define CFG_F_L7_NO_CLIENTS        (1U << 3)

#define EP_MAX_IP4 4
#define EP_MAX_IP6 4
#define EP_MAX_LL  4

/* One IPv6 address as 4 words (network order bytes); a struct rather than a 2-D
 * array because bcc's ctypes translation mishandles 2-D arrays. */
struct ip6_words {
	__u32 w[4];
};

/* endpoints: ifindex (u32, host order) -> endpoint_info */
struct endpoint_info {
	__u32 endpoint_id;
	__u32 identity;
	__u32 flags;          /* EP_F_* */
	__u8  mac[6];
	__u8  n_ip4;          /* used slots of ip4[] */
	__u8  n_ip6;          /* used slots of ip6[] */
	__be32 ip4[EP_MAX_IP4];
	struct ip6_words ip6[EP_MAX_IP6];
	/* Where DHCP requests (and, while unidentified, neighbour discovery) of this
	 * endpoint go: 0 nowhere (dropped); the endpoint's own ifindex: the host stack
	 * behind it (not bridged); another ifindex: redirected into that device (the
	 * bridge the interface belongs to), never flooded to other ports. */
	__u32 host_ifindex;
	__u8  n_ll;           /* used slots of ll[] */
	__u8  pad[3];
	/* IPv6 link-local addresses of the endpoint (learned from its namespace, or
	 * derived from its MAC): the only fe80::/10 sources it may use. */
	struct ip6_words ll[EP_MAX_LL];
};

/* ipcache4 / ipcache6: LPM over the address (network order) */
struct ipcache4_key {
	__u32 prefixlen;
	__u8  addr[4];
};

struct ipcache6_key {
	__u32 prefixlen;
	__u8  addr[16];
};

struct ipcache_value {
	__u32 identity;
};

/* policy: see "Policy key" and "Policy generations" above */
#define POLICY_DIR_GEN 0x80 /* policy_key.direction: entry of generation 1 */

struct policy_key {
	__u32  prefixlen;
	__u32  local;
	__u32  peer;
	__u8   direction;
	__u8   proto;
	__be16 port;
};

struct policy_value {
	__u8  deny;
	__u8  pad[3];
	__u32 policy_id;  /* which policies made this entry (the agent's table); events carry it */
};

/* policy_flags: (local identity, direction) -> enforcement. Absent = not enforced. */
struct policy_flags_key {
	__u32 identity;
	__u8  direction;
	__u8  pad[3];
};

struct policy_flags_value {
	__u8 enforced;
	__u8 default_deny;
	__u8 gen;         /* v2: generation of the pair's policy entries in force (0/1) */
	__u8 pad;
};

/* conntrack (v2): a plain hash, never evicted; entries are charged to owners with
 * budgets (see struct ct_owner). */
struct ct_key {
	__u32 ifindex;
	__u8  saddr[16];  /* IPv4: first 4 bytes, rest zero */
	__u8  daddr[16];
	__be16 sport;     /* ICMP query messages: identifier; other ICMP: 0 */
	__be16 dport;     /* ICMP: 0 */
	__u8  proto;
	__u8  direction;  /* direction of the first packet */
	__u8  family;     /* 4 or 6 */
	__u8  icmp_type;  /* ICMP / ICMPv6: type of the first packet; else 0 */
};

#define CT_STATE_NEW         0 /* TCP SYN seen, no reply yet; other protocols */
#define CT_STATE_ESTABLISHED 1
#define CT_STATE_CLOSING     2
#define CT_STATE_REVOKED     3 /* the agent judged the flow again and the policy denies it */

struct ct_value {
	__u64 expires;    /* bpf_ktime_get_ns() deadline; past = absent */
	__u64 created;
	__u8  state;      /* CT_STATE_* */
	__u8  audited;    /* created by an audited would-be drop */
	__u8  pad[2];
	__u32 owner_peer; /* v2: ct_owner.peer this entry is charged to */
};

/* Conntrack budgets. Entries are charged to an owner: at an endpoint's egress hook
 * the endpoint itself (peer 0: flows it opens), at its ingress hook the endpoint and
 * the identity of the peer that opened the flow, so one peer filling its budget
 * leaves other peers' new flows to the same endpoint alone. Each owner may hold
 * CT_ENDPOINT_MAX entries once the table holds CT_PRESSURE_ENTRIES (conntrack.h);
 * the owner with ifindex 0 counts the whole table. ct_created (hash, written by the
 * programs only, atomic adds) counts entries an owner inserted; ct_released (hash,
 * written by the agent only) counts entries the agent deleted, minus entries it
 * migrated in.
 * created - released (mod 2^64) is the owner's live entry count: each map has one
 * writer, so neither loses an update. ct_value.owner_peer says whom an entry is
 * charged to. */
struct ct_owner {
	__u32 ifindex;
	__u8  direction;
	__u8  pad[3];
	__u32 peer;       /* DIR_INGRESS: identity of the peer; DIR_EGRESS: 0 */
};

struct ct_count {
	__u64 n;
};

/* frag: LRU (source, destination, IP id, protocol) -> what the first fragment
 * carried, so later fragments (which have no L4 header) are judged by the same
 * ports. proto: IPv4 protocol / next header of the IPv6 fragment header. */
struct frag_key {
	__u8  family;
	__u8  proto;
	__u8  pad[2];
	__u32 id;         /* IPv4: the 16-bit id (network order) in the low bytes; IPv6: 32-bit id */
	__u8  saddr[16];
	__u8  daddr[16];
};

struct frag_value {
	__be16 sport;     /* as in struct pkt: ports, or ICMP query identifier */
	__be16 dport;
	__u8  l4_proto;   /* protocol of the L4 header found in the first fragment */
	__u8  has_ports;
	__u8  icmp_type;
	__u8  icmp_code;
};

/* counters: per-CPU array, index COUNTER_INDEX(dir, verdict, reason) */
struct counter_value {
	__u64 packets;
	__u64 bytes;
};

/* config: array[1] */
struct config_value {
	__u32 flags;      /* CFG_F_* */
};

/* flow_event.policy_match: how the policy decided a new flow (low nibble), plus
 * which lookups found an entry (high bits). 0 for events that are not a policy
 * decision (drops before policy, ct_full keeps the match of its allow). */
#define MATCH_NONE          0
#define MATCH_NOT_ENFORCED  1 /* (local identity, direction) not enforced */
#define MATCH_ALLOW         2 /* an allow entry matched */
#define MATCH_DENY          3 /* a deny entry matched */
#define MATCH_DEFAULT_DENY  4 /* enforced, no entry, default deny */
#define MATCH_DEFAULT_ALLOW 5 /* enforced, no entry, allow on miss */
#define MATCH_F_EXACT       0x10 /* the exact-peer lookup found an entry */
#define MATCH_F_ANY         0x20 /* the any-peer (0) lookup found an entry */

/* Event rate limits: one token bucket per CPU and class (event_buckets, a per-CPU
 * array indexed by EVENT_CLASS_*). Tokens are kept as nanoseconds of budget: an
 * event costs NSEC_PER_SEC / rate, the bucket holds at most burst events. */
#define EVENT_CLASS_NEW  0 /* forwarded / audit verdicts of new connections */
#define EVENT_CLASS_DROP 1 /* drops */
#define NUM_EVENT_CLASSES 2

/* events_lost: per-CPU array of __u64, index: */
#define EVENTS_LOST_RATE_NEW  0 /* over the new-connection budget */
#define EVENTS_LOST_RATE_DROP 1 /* over the drop budget */
#define EVENTS_LOST_RINGBUF   2 /* ring buffer full (agent too slow) */
#define NUM_EVENTS_LOST       3

struct event_bucket {
	__u64 tokens;     /* ns of budget left */
	__u64 last;       /* bpf_ktime_get_ns of the last refill */
};

/* events: ring buffer records */
struct flow_event {
	__u64 timestamp;      /* bpf_ktime_get_ns */
	__u32 ifindex;
	__u32 src_identity;
	__u32 dst_identity;
	__u8  direction;
	__u8  verdict;
	__u8  reason;
	__u8  ip_version;     /* 4 or 6; 0 for ARP (addresses: spa / tpa) */
	__u8  saddr[16];      /* network order */
	__u8  daddr[16];
	__u16 sport;          /* host order */
	__u16 dport;
	__u8  proto;
	__u8  tcp_flags;
	__u8  icmp_type;
	__u8  is_reply;
	__u32 pkt_len;        /* skb->len of the packet that made the event */
	__u8  policy_match;   /* MATCH_* | MATCH_F_* */
	__u8  icmp_code;
	__u8  pad[2];
	__u32 policy_exact;   /* policy_id of the exact-peer entry that matched (0: none) */
	__u32 policy_any;     /* policy_id of the any-peer entry that matched (0: none) */
};

/* L7 steering (lib/l7.h). l7_ports: hash, an L7-enforced TCP port of a local
 * endpoint's address -> its identity: of a server (L7_SERVER: ingress rules, connections
 * to addr:port) or of a client (L7_CLIENT: egress rules, connections from addr to any
 * peer's port). l7_host: hash, an endpoint's host-side ifindex
 * -> where a steered packet enters the host's IP stack: the bridge device (ifindex and
 * MAC), or the host-side interface itself when it is routed (its own ifindex and MAC). */
#define L7_SERVER 0
#define L7_CLIENT 1

struct l7_port_key {
	__u8  family;     /* 4 or 6 */
	__u8  kind;       /* L7_SERVER or L7_CLIENT */
	__be16 port;      /* network order */
	__u8  addr[16];   /* network order; IPv4: first 4 bytes, rest zero */
};

struct l7_port_value {
	__u32 identity;
};

struct l7_host {
	__u32 ifindex;
	__u8  mac[6];
	__u8  pad[2];
};

#endif /* STOCKADE_MAPS_H */
