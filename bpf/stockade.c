/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Stockade tc programs. Build-time settings (#defines such as STOCKADE_PIN_DIR,
 * map sizes and conntrack lifetimes) are prepended by
 * stockade.datapath.loader from its settings dict. The loader inlines the
 * "quoted" includes below into one text: bcc rewrites map accesses only in its
 * main file.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "include/stockade_maps.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/endpoint.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/metrics.h"
#include "lib/l7.h"
#include "lib/datapath.h"

/* tc ingress of the host-side interface: packets the workload sends. */
int from_endpoint(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}

/* tc egress of the host-side interface: packets delivered to the workload. */
int to_endpoint(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}
