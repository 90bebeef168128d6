/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map declarations. Every map except the event ring buffer and its rate-limit state
 * is pinned under STOCKADE_PIN_DIR, so a restarted loader reuses the maps (and their
 * values) instead of creating new ones. Sizes come from the loader's settings dict;
 * the pin paths PIN_<map> (name plus layout version, see stockade_maps.h) from
 * stockade.datapath.loader.LAYOUT_VERSIONS.
 */
#ifndef STOCKADE_LIB_MAPS_H
#define STOCKADE_LIB_MAPS_H

BPF_TABLE_PINNED("hash", __u32, struct endpoint_info, endpoints,
		 ENDPOINTS_MAX, PIN_endpoints);
BPF_TABLE_PINNED("lpm_trie", struct ipcache4_key, struct ipcache_value, ipcache4,
		 IPCACHE_MAX, PIN_ipcache4, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct ipcache6_key, struct ipcache_value, ipcache6,
		 IPCACHE_MAX, PIN_ipcache6, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_value, policy,
		 POLICY_MAX, PIN_policy, BPF_F_NO_PREALLOC);
/* Not preallocated: a replaced flags entry (the generation switch) stays intact until
 * every program that read it is done, so its flags and generation are read as one. */
BPF_TABLE_PINNED("hash", struct policy_flags_key, struct policy_flags_value, policy_flags,
		 POLICY_FLAGS_MAX, PIN_policy_flags, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct ct_key, struct ct_value, conntrack,
		 CT_MAX, PIN_conntrack);
/* Not preallocated: an owner the agent prunes stays valid memory (RCU) for a
 * program that still holds it. */
BPF_TABLE_PINNED("hash", struct ct_owner, struct ct_count, ct_created,
		 CT_OWNERS_MAX, PIN_ct_created, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct ct_owner, struct ct_count, ct_released,
		 CT_OWNERS_MAX, PIN_ct_released, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct frag_key, struct frag_value, frag,
		 FRAG_MAX, PIN_frag);
BPF_TABLE_PINNED("percpu_array", __u32, struct counter_value, counters,
		 NUM_COUNTERS, PIN_counters);
BPF_TABLE_PINNED("array", __u32, struct config_value, config,
		 1, PIN_config);
BPF_TABLE_PINNED("hash", struct l7_port_key, struct l7_port_value, l7_ports,
		 L7_PORTS_MAX, PIN_l7_ports);
BPF_TABLE_PINNED("hash", __u32, struct l7_host, l7_host,
		 ENDPOINTS_MAX, PIN_l7_host);
/* Not pinned: a restarted agent opens a fresh stream (events are not state). */
BPF_RINGBUF_OUTPUT(events, EVENTS_PAGES);
BPF_PERCPU_ARRAY(event_buckets, struct event_bucket, NUM_EVENT_CLASSES);
BPF_PERCPU_ARRAY(events_lost, __u64, NUM_EVENTS_LOST);

#endif
