#!/usr/bin/env bash
# make demo: the offline policy tools on the demo inventory (the agent demo replaces
# this once the agent lands).
set -euo pipefail
cd "$(dirname "$0")/.."
S=.venv/bin/stockade
P=(inventories/demo/policies/*.yaml)
echo "== stockade policy validate ${P[*]}"
$S policy validate "${P[@]}"
echo
echo "== stockade policy trace --src app=frontend --dst app=api --dport 8080/tcp"
$S policy trace --src app=frontend --dst app=api --dport 8080/tcp "${P[@]}"
echo
echo "== stockade policy trace --src app=frontend --dst app=db --dport 5432/tcp"
$S policy trace --src app=frontend --dst app=db --dport 5432/tcp "${P[@]}"
echo
echo "== stockade policy test inventories/demo/policy_tests.yaml"
$S policy test inventories/demo/policy_tests.yaml "${P[@]}"
