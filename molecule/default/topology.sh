#!/usr/bin/env bash
# The simulated hosts of the Molecule scenario, made from network namespaces.
#
#   topology.sh up    HOST:INDEX:WL[,WL...] ...   WL = name/ip[/port]
#   topology.sh down  HOST:INDEX:WL[,WL...] ...
#   topology.sh check HOST:INDEX:WL[,WL...] ...   exit 1 if anything is left
#
# Host HOST is namespace skm-HOST with fab0 = 192.168.77.INDEX/24 on the fabric bridge
# skm-fab (root namespace, no address: the root namespace never routes), and a bridge
# wbr0 = 10.77.INDEX.1/24 for its workloads. Workload W is namespace skm-HOST-W with eth0
# on wbr0 through the veth W-h; with a port it runs busybox httpd serving /cgi-bin/ip,
# which answers the client's address as the server saw it. Routes send every other
# host's workload subnet to that host's fabric address: routed, no NAT.
# Each host gets a bpffs at /run/skm-HOST/bpf (outside /sys, which `ip netns exec` hides).
# Only names made here are deleted; processes are stopped by their PID files only.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WWW=/run/skm-www
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
  if ! q ip link show skm-fab; then
    ip link add skm-fab type bridge stp_state 0
    echo 1 > /proc/sys/net/ipv6/conf/skm-fab/disable_ipv6 || true
    ip link set skm-fab up
  fi
  for spec in "${HOSTS[@]}"; do
    IFS=: read -r host idx wls <<< "$spec"
    ns="skm-$host" run="/run/skm-$host"
    mkdir -p "$run/bpf"
    mountpoint -q "$run/bpf" || mount -t bpf bpf "$run/bpf"
    q ip netns pids "$ns" || ip netns add "$ns"
    ip -n "$ns" link set lo up
    if ! q ip link show "skm-$host-f"; then
      ip link add "skm-$host-f" type veth peer name fab0 netns "$ns"
      echo 1 > "/proc/sys/net/ipv6/conf/skm-$host-f/disable_ipv6" || true
      ip link set "skm-$host-f" master skm-fab up
      ip -n "$ns" addr add "192.168.77.$idx/24" dev fab0
      ip -n "$ns" link set fab0 up
      ip -n "$ns" link add wbr0 type bridge stp_state 0
      ip -n "$ns" addr add "10.77.$idx.1/24" dev wbr0
      ip -n "$ns" link set wbr0 up
      ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    fi
    IFS=, read -r -a wl <<< "$wls"
    for w in "${wl[@]}"; do
      IFS=/ read -r name ip port <<< "$w"
      wns="skm-$host-$name"
      if ! q ip netns pids "$wns"; then
        ip netns add "$wns"
        ip -n "$ns" link add "$name-h" type veth peer name eth0 netns "$wns"
        ip -n "$ns" link set "$name-h" master wbr0 up
        ip -n "$wns" link set lo up
        ip -n "$wns" addr add "$ip/24" dev eth0
        ip -n "$wns" link set eth0 up
        ip -n "$wns" route add default via "10.77.$idx.1"
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
      ip -n "skm-$host" route replace "10.77.$pidx.0/24" via "192.168.77.$pidx"
    done
  done
}

down() {
  for spec in "${HOSTS[@]}"; do
    IFS=: read -r host idx wls <<< "$spec"
    ns="skm-$host" run="/run/skm-$host"
    # the role's uninstall normally did this; here only what is left behind
    if pid_alive "$run/agent.pid" "stockade"; then
      kill -TERM "$(cat "$run/agent.pid")"; sleep 1
      pid_alive "$run/agent.pid" "stockade" && kill -KILL "$(cat "$run/agent.pid")"
    fi
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
      q ip netns del "skm-$host-$name" || true
    done
    q ip netns del "$ns" || true
    q ip link del "skm-$host-f" || true
    if mountpoint -q "$run/bpf"; then umount "$run/bpf"; fi
    rm -rf "$run"
  done
  q ip link del skm-fab || true
  rm -rf "$WWW"
}

check() {
  local left=()
  q ip link show skm-fab && left+=("link skm-fab")
  [ -e "$WWW" ] && left+=("$WWW")
  for spec in "${HOSTS[@]}"; do
    IFS=: read -r host idx wls <<< "$spec"
    q ip netns pids "skm-$host" && left+=("netns skm-$host")
    q ip link show "skm-$host-f" && left+=("link skm-$host-f")
    [ -e "/run/skm-$host" ] && left+=("/run/skm-$host")
    grep -q " /run/skm-$host/bpf " /proc/mounts && left+=("bpffs /run/skm-$host/bpf")
    IFS=, read -r -a wl <<< "$wls"
    for w in "${wl[@]}"; do
      IFS=/ read -r name _ _ <<< "$w"
      q ip netns pids "skm-$host-$name" && left+=("netns skm-$host-$name")
    done
  done
  # processes: looked for (never killed) by what they were started with
  for spec in "${HOSTS[@]}"; do
    IFS=: read -r host _ _ <<< "$spec"
    pgrep -f -- "--config /run/skm-$host/agent.yaml" >/dev/null && left+=("agent process of $host")
  done
  pgrep -f -- "-h $WWW" >/dev/null && left+=("workload httpd")
  if [ ${#left[@]} -gt 0 ]; then echo "left behind: ${left[*]}" >&2; exit 1; fi
  echo "nothing left"
}

"$cmd"
