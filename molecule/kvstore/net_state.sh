#!/usr/bin/env bash
# Where a packet between simulated hosts went: a snapshot of each namespace's nonzero
# kernel counters (nstat), its links' packet and drop counts, neighbours and the
# nftables rules that counted anything; the root namespace's conntrack use. Shown by
# verify.yml when a check fails.
#   net_state.sh NS...
LINKS='import json, sys
for link in json.load(sys.stdin):
    rx, tx = link["stats64"]["rx"], link["stats64"]["tx"]
    print(link["ifname"], "rx", rx["packets"], "drop", rx["dropped"], "tx", tx["packets"], "drop", tx["dropped"])'
echo "== root: nf_conntrack $(cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo -)/$(cat /proc/sys/net/netfilter/nf_conntrack_max 2>/dev/null || echo -); $(dmesg 2>/dev/null | grep -ciE 'nf_conntrack|table full|dropping packet') conntrack messages in dmesg"
for ns in "$@"; do
  echo "== $ns"
  ip netns exec "$ns" nstat -asz 2>/dev/null | awk 'NR > 1 && $2 != 0 { printf "%s=%s ", $1, $2 } END { print "" }'
  ip -n "$ns" -j -s link show | python3 -c "$LINKS"
  ip -n "$ns" neigh show | tr '\n' ';'; echo
  ip netns exec "$ns" nft list ruleset 2>/dev/null | grep -E "counter packets [1-9]" | sed 's/^ *//'
done
