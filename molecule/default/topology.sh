#!/usr/bin/env bash
# The simulated hosts of the Molecule scenario, made from network namespaces.
#
#   topology.sh up    HOST:INDEX:WL[,WL...] ...   WL = name/ip[/port]
#   topology.sh down  HOST:INDEX:WL[,WL...] ...
#   topology.sh check HOST:INDEX:WL[,WL...] ...   exit 1 if anything is left
#
# Host HOST is namespace skm-HOST with fab0 = 192.168.77.INDEX/24 on the fabric (bridge
# fab in namespace skm-fabric, port HOST, no address, nothing routed there) and a bridge
# wbr0 = 10.77.INDEX.1/24, MAC 02:5b:00:00:INDEX:01, for its workloads. The fabric is a
# namespace of its own so that frames between hosts never meet the root namespace's
# netfilter (br_netfilter would put them through its conntrack and rules, which other
# software and tests change). Workload W is namespace skm-HOST-W with eth0 on wbr0
# through the veth W-h; with a port it runs busybox httpd serving /cgi-bin/ip,
# which answers the client's address as the server saw it. Routes send every other
# host's workload subnet to that host's fabric address: routed, no NAT.
# Each host gets a bpffs at /run/skm-HOST/bpf (outside /sys, which `ip netns exec` hides).
# Only names made here are deleted; processes are stopped by their PID files only.
# SKM_PREFIX, SKM_FABRIC and SKM_WORKLOADS rename all of it (molecule/kvstore: skk,
# 192.168.78, 10.78) so that two scenarios can run side by side.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
P="${SKM_PREFIX:-skm}" FAB="${SKM_FABRIC:-192.168.77}" WL="${SKM_WORKLOADS:-10.77}"
FABNS="$P-fabric"
WWW="/run/$P-www"
cmd="$1"; shift
HOSTS=("$@")

q() { "$@" >/dev/null 2>&1; }

pid_alive() {  # pidfile, expected word in cmdline
  [ -s "$1" ] || return 1
  local p; p="$(cat "$1")"
  [ -d "/proc/$p" ] && tr '\0' ' ' < "/proc/$p/cmdline" | grep -q -- "$2"
}

up() {
  mkdir -p "$WWW/cgi-bin"
  echo ok > "$WWW/index.html"
  printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n%%s\\n" "$REMOTE_ADDR"\n' > "$WWW/cgi-bin/ip"
  chmod 755 "$WWW/cgi-bin/ip"
  if ! q ip netns pids "$FABNS"; then
    ip netns add "$FABNS"
    ip -n "$FABNS" link set lo up
    ip -n "$FABNS" link add fab type bridge stp_state 0
    ip netns exec "$FABNS" sysctl -qw net.ipv6.conf.fab.disable_ipv6=1
    ip -n "$FABNS" link set fab up
  fi
  for spec in "${HOSTS[@]}"; do
    IFS=: read -r host idx wls <<< "$spec"
    ns="$P-$host" run="/run/$P-$host"
    mkdir -p "$run/bpf"
    mountpoint -q "$run/bpf" || mount -t bpf bpf "$run/bpf"
    q ip netns pids "$ns" || ip netns add "$ns"
    ip -n "$ns" link set lo up
    if ! q ip -n "$FABNS" link show "$host"; then
      ip -n "$FABNS" link add "$host" type veth peer name fab0 netns "$ns"
      ip netns exec "$FABNS" sysctl -qw "net.ipv6.conf.$host.disable_ipv6=1"
      ip -n "$FABNS" link set "$host" master fab up
      ip -n "$ns" addr add "$FAB.$idx/24" dev fab0
      ip -n "$ns" link set fab0 up
      # a fixed MAC: a bridge left to choose takes its lowest port's and changes it when
      # a lower one joins (web2, made in verify); a workload that still has the old one
      # (another port's) in its ARP cache then has its frames to the host dropped as
      # PACKET_OTHERHOST until it resolves the host again (molecule/kvstore, h1's death)
      ip -n "$ns" link add wbr0 address "02:5b:00:00:$(printf %02x "$idx"):01" type bridge stp_state 0
      ip -n "$ns" addr add "$WL.$idx.1/24" dev wbr0
      ip -n "$ns" link set wbr0 up
      ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    fi
    IFS=, read -r -a wl <<< "$wls"
    for w in "${wl[@]}"; do
      IFS=/ read -r name ip port <<< "$w"
      wns="$P-$host-$name"
      if ! q ip netns pids "$wns"; then
        ip netns add "$wns"
        ip -n "$ns" link add "$name-h" type veth peer name eth0 netns "$wns"
        ip -n "$ns" link set "$name-h" master wbr0 up
        ip -n "$wns" link set lo up
        ip -n "$wns" addr add "$ip/24" dev eth0
        ip -n "$wns" link set eth0 up
        ip -n "$wns" route add default via "$WL.$idx.1"
      fi
      if [ -n "${port:-}" ] && ! pid_alive "$run/$name.pid" httpd; then
        setsid ip netns exec "$wns" busybox httpd -f -p "$port" -h "$WWW" \
          >"$run/$name.log" 2>&1 </dev/null &
        echo $! > "$run/$name.pid"
      fi
    done
  done
  # routes: every host reaches every other host's workload subnet through the fabric
  for spec in "${HOSTS[@]}"; do
    IFS=: read -r host idx _ <<< "$spec"
    for peer in "${HOSTS[@]}"; do
      IFS=: read -r _ pidx _ <<< "$peer"
      [ "$pidx" = "$idx" ] && continue
      ip -n "$P-$host" route replace "$WL.$pidx.0/24" via "$FAB.$pidx"
    done
  done
}

down() {
  for spec in "${HOSTS[@]}"; do
    IFS=: read -r host idx wls <<< "$spec"
    ns="$P-$host" run="/run/$P-$host"
    # the role's uninstall normally did this; here only what is left behind
    if pid_alive "$run/agent.pid" "stockade"; then
      kill -TERM "$(cat "$run/agent.pid")"; sleep 1
      pid_alive "$run/agent.pid" "stockade" && kill -KILL "$(cat "$run/agent.pid")"
    fi
    # an etcd member (molecule/kvstore) the role's uninstall did not stop
    if pid_alive "$run/etcd.pid" "etcd"; then kill -KILL "$(cat "$run/etcd.pid")"; fi
    if [ -f "$run/agent.yaml" ] && q ip netns pids "$ns"; then
      ip netns exec "$ns" "$ROOT/.venv/bin/stockade" agent --cleanup --config "$run/agent.yaml" >/dev/null 2>&1 || true
    fi
    for f in "$run"/probe-*.pid; do  # the no-window probe (probe.py), if still running
      if pid_alive "$f" probe.py; then kill -TERM "$(cat "$f")"; fi
    done
    IFS=, read -r -a wl <<< "$wls"
    for w in "${wl[@]}"; do
      IFS=/ read -r name _ _ <<< "$w"
      if pid_alive "$run/$name.pid" httpd; then kill -TERM "$(cat "$run/$name.pid")"; fi
      q ip netns del "$P-$host-$name" || true
    done
    q ip netns del "$ns" || true   # its fab0, and with it its port on the fabric
    if mountpoint -q "$run/bpf"; then umount "$run/bpf"; fi
    rm -rf "$run"
  done
  q ip netns del "$FABNS" || true
  rm -rf "$WWW"
}

check() {
  local left=()
  q ip netns pids "$FABNS" && left+=("netns $FABNS")
  [ -e "$WWW" ] && left+=("$WWW")
  for spec in "${HOSTS[@]}"; do
    IFS=: read -r host idx wls <<< "$spec"
    q ip netns pids "$P-$host" && left+=("netns $P-$host")
    [ -e "/run/$P-$host" ] && left+=("/run/$P-$host")
    grep -q " /run/$P-$host/bpf " /proc/mounts && left+=("bpffs /run/$P-$host/bpf")
    IFS=, read -r -a wl <<< "$wls"
    for w in "${wl[@]}"; do
      IFS=/ read -r name _ _ <<< "$w"
      q ip netns pids "$P-$host-$name" && left+=("netns $P-$host-$name")
    done
  done
  # processes: looked for (never killed) by what they were started with
  for spec in "${HOSTS[@]}"; do
    IFS=: read -r host _ _ <<< "$spec"
    pgrep -f -- "--config /run/$P-$host/agent.yaml" >/dev/null && left+=("agent process of $host")
    pgrep -f -- "--config-file /run/$P-$host/" >/dev/null && left+=("etcd process of $host")
  done
  pgrep -f -- "-h $WWW" >/dev/null && left+=("workload httpd")
  if [ ${#left[@]} -gt 0 ]; then echo "left behind: ${left[*]}" >&2; exit 1; fi
  echo "nothing left"
}

"$cmd"
