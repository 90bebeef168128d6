/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map declarations. Every map except the event ring buffer and its rate-limit state is pinned under
 * STOCKADE_PIN_DIR, so a restarted loader reuses the maps (and their values)
 * instead of creating new ones. Sizes come from the loader's settings dict.
 */
#ifndef STOCKADE_LIB_MAPS_H
#define STOCKADE_LIB_MAPS_H

BPF_TABLE_PINNED("hash", __u32, struct endpoint_info, endpoints,
		 ENDPOINTS_MAX, STOCKADE_PIN_DIR "/endpoints");
BPF_TABLE_PINNED("lpm_trie", struct ipcache4_key, struct ipcache_value, ipcache4,
		 IPCACHE_MAX, STOCKADE_PIN_DIR "/ipcache4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct ipcache6_key, struct ipcache_value, ipcache6,
		 IPCACHE_MAX, STOCKADE_PIN_DIR "/ipcache6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct policy_key, struct policy_value, policy,
		 POLICY_MAX, STOCKADE_PIN_DIR "/policy", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct policy_flags_key, struct policy_flags_value, policy_flags,
		 POLICY_FLAGS_MAX, STOCKADE_PIN_DIR "/policy_flags");
BPF_TABLE_PINNED(CT_MAP_TYPE, struct ct_key, struct ct_value, conntrack,
		 CT_MAX, STOCKADE_PIN_DIR "/conntrack");
BPF_TABLE_PINNED("percpu_array", __u32, struct counter_value, counters,
		 NUM_COUNTERS, STOCKADE_PIN_DIR "/counters");
BPF_TABLE_PINNED("array", __u32, struct config_value, config,
		 1, STOCKADE_PIN_DIR "/config");
/* Not pinned: a restarted agent opens a fresh stream (events are not state). */
BPF_RINGBUF_OUTPUT(events, EVENTS_PAGES);
BPF_PERCPU_ARRAY(event_buckets, struct event_bucket, NUM_EVENT_CLASSES);
BPF_PERCPU_ARRAY(events_lost, __u64, NUM_EVENTS_LOST);

#endif
