#!/usr/bin/env bash
# The demo's workloads around the agent (playbooks/demo.yml); every command is re-runnable
# and prints one word saying what it did. Processes are known by PID files only.
#   demo_env.sh podman-up             Podman API service on /run/stockade-demo/podman.sock
#   demo_env.sh net-up                Podman network stockade-demo (10.91.0.0/24); prints its bridge
#   demo_env.sh vm-up                 namespace stockade-demo-vm on veth sdvm0 (10.90.0.2)
#   demo_env.sh container NAME PORT   container stockade-demo-NAME (label app=NAME, httpd on PORT)
#   demo_env.sh ip NAME               a container's address
#   demo_env.sh try FROM IP PORT      an HTTP request from FROM (host, vm or a container name)
#   demo_env.sh down                  remove containers, namespace, veth, Podman service
set -euo pipefail
RUN=/run/stockade-demo
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)
IMAGE=localhost/stockade-bb:latest
VM=stockade-demo-vm
GET="printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2"
mkdir -p "$RUN"

alive() { [ -s "$1" ] && [ -d "/proc/$(cat "$1")" ] && tr '\0' ' ' < "/proc/$(cat "$1")/cmdline" | grep -q -- "$2"; }

case "$1" in
  podman-up)
    if alive "$RUN/podman.pid" "system service" && [ -S "$RUN/podman.sock" ]; then echo running; exit 0; fi
    rm -f "$RUN/podman.sock"
    setsid "${PODMAN[@]}" system service -t 0 "unix://$RUN/podman.sock" >"$RUN/podman.log" 2>&1 </dev/null &
    echo $! > "$RUN/podman.pid"
    for _ in $(seq 75); do [ -S "$RUN/podman.sock" ] && { echo started; exit 0; }; sleep 0.2; done
    echo "the Podman service did not start; see $RUN/podman.log" >&2; exit 1 ;;
  net-up)
    if ! "${PODMAN[@]}" network exists stockade-demo; then
      "${PODMAN[@]}" network create --subnet 10.91.0.0/24 stockade-demo >/dev/null
    fi
    "${PODMAN[@]}" network inspect --format '{{.NetworkInterface}}' stockade-demo ;;
  vm-up)
    if ip netns pids "$VM" >/dev/null 2>&1; then echo running; exit 0; fi
    ip netns add "$VM"
    ip link add sdvm0 type veth peer name eth0 netns "$VM"
    ip addr add 10.90.0.1/24 dev sdvm0
    ip link set sdvm0 up
    ip -n "$VM" link set lo up
    ip -n "$VM" addr add 10.90.0.2/24 dev eth0
    ip -n "$VM" link set eth0 up
    ip -n "$VM" route add default via 10.90.0.1
    echo started ;;
  container)
    name="stockade-demo-$2"
    state="$("${PODMAN[@]}" container inspect --format '{{.State.Status}} {{.State.Pid}}' "$name" 2>/dev/null || true)"
    # Podman's record can say running after the container's processes were killed
    # (the machine's processes ended without Podman seeing it): trust only a live PID.
    pid="${state#* }"
    if [ "${state%% *}" = running ] && [ "${pid:-0}" -gt 0 ] && [ -d "/proc/$pid" ]; then
      echo running; exit 0
    fi
    [ -n "$state" ] && "${PODMAN[@]}" rm -f -t 0 "$name" >/dev/null
    # $4: the container's own labels ("-": none; its identity then comes from a service)
    labels=()
    [ "${4:-app=$2}" != - ] && labels=(--label "${4:-app=$2}")
    "${PODMAN[@]}" run -d --name "$name" "${labels[@]}" --network stockade-demo "$IMAGE" \
      sh -c "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p $3 -h /www" >/dev/null
    echo started ;;
  ip)
    "${PODMAN[@]}" container inspect \
      --format '{{(index .NetworkSettings.Networks "stockade-demo").IPAddress}}' "stockade-demo-$2" ;;
  try)
    case "$2" in
      host) out="$(busybox sh -c "$GET $3 $4" 2>/dev/null || true)" ;;
      vm) out="$(ip netns exec "$VM" busybox sh -c "$GET $3 $4" 2>/dev/null || true)" ;;
      *) out="$("${PODMAN[@]}" exec "stockade-demo-$2" sh -c "$GET $3 $4" 2>/dev/null || true)" ;;
    esac
    case "$out" in *"200 OK"*) echo allowed ;; *) echo denied ;; esac ;;
  down)
    for c in frontend api db; do "${PODMAN[@]}" rm -f -t 0 "stockade-demo-$c" >/dev/null 2>&1 || true; done
    "${PODMAN[@]}" network rm stockade-demo >/dev/null 2>&1 || true
    ip netns del "$VM" 2>/dev/null || true
    ip link del sdvm0 2>/dev/null || true
    if alive "$RUN/podman.pid" "system service"; then kill -TERM "$(cat "$RUN/podman.pid")"; fi
    "${PODMAN[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true
    rm -rf "$RUN" /var/lib/stockade-demo
    echo removed ;;
  *) echo "usage: see the top of $0" >&2; exit 2 ;;
esac
