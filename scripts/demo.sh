#!/usr/bin/env bash
# make demo: the agent on this machine with Podman containers and a VM stand-in, the demo
# inventory's policy, and a table of real connection attempts (playbooks/demo.yml).
# Re-runnable; `make demo-down` (scripts/demo.sh --down) removes it all.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg"
if [ "${1:-}" = --down ]; then
  exec ansible-playbook -i inventories/demo/hosts.yml playbooks/demo.yml -e demo_state=absent
fi
ansible-playbook -i inventories/demo/hosts.yml playbooks/demo.yml "$@"
if [ -f /run/stockade-demo/table.txt ]; then
  echo
  echo "== Connection attempts (real traffic through the agent's eBPF datapath)"
  cat /run/stockade-demo/table.txt
fi
echo
echo "Agent: .venv/bin/stockade status   (socket /run/stockade/agent.sock, log /var/log/stockade/agent.log)"
echo "Web UI: http://127.0.0.1:8470/   (login token: sudo cat /etc/stockade/webui.token; log /var/log/stockade/webui.log)"
echo "Remove everything: make demo-down"
