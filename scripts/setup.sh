#!/usr/bin/env bash
# Make this Debian 12 machine ready to build, run and test Stockade.
# Idempotent: a second run checks each step and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then echo "setup: run as root" >&2; exit 1; fi

APT_PACKAGES=(
  python3-bpfcc python3-venv python3-dev
  iproute2 iputils-ping podman runc nftables iptables iperf3 ethtool gcc libc6-dev linux-perf
  busybox-static curl ca-certificates chromium qemu-system-x86 python3-libvirt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  systemd python3-apt python3-yaml dnsmasq-base
  etcd-server etcd-client haproxy prometheus wrk debootstrap dnsmasq cpio gzip openssh-client
  ansible-core  # Debian 12's ansible-core 2.14: the oldest the collection is tested with (tests/ansible/test_debian_ansible.py)
)
# Kernel headers are checked separately (exact package or fallback).

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

kver="$(uname -r)"
headers_ok() { [ -e "/lib/modules/$kver/build/include/linux/kconfig.h" ] || [ -e "/lib/modules/$kver/build/include/generated/autoconf.h" ]; }

apt_updated=0
apt_update() { if [ $apt_updated = 0 ]; then apt-get update -qq; apt_updated=1; fi; }

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt_update
  # Packages such as etcd-server, prometheus and dnsmasq start a service on install; the
  # tests start their own instances, so keep the package scripts from starting any.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! headers_ok; then
  apt_update
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$kver" >/dev/null
  else
    echo "setup: WARNING: no linux-headers-$kver package for the running kernel;" \
         "falling back to the distribution's nearest headers (linux-headers-amd64)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-headers-amd64 >/dev/null
    hdr="$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1)"
    common="${hdr%-amd64}-common"
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    ln -sfn "$common" "/lib/modules/$kver/source"
    echo "setup: WARNING: linked /lib/modules/$kver/{build,source} -> $hdr, $common" >&2
  fi
fi

# bpffs
if ! mount | grep -q "^bpf on /sys/fs/bpf type bpf"; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# the group that may read the agent socket
getent group stockade >/dev/null || groupadd --system stockade

# virtualenv with the project, editable, plus dev extras
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.stockade-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade "pip>=24"
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
fi
echo "setup: ok"
