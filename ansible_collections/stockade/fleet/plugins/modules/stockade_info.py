#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Stockade contributors
# SPDX-License-Identifier: Apache-2.0 OR GPL-3.0-or-later
# Apache License 2.0, or (at your option) the GNU General Public License v3.0+
# (see https://www.apache.org/licenses/LICENSE-2.0 and https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: stockade_info
short_description: Read the state of a Stockade agent
description:
  - Asks the Stockade agent on the managed host for its health, endpoints, identities,
    ipcache, policies and packet counters, through its API socket.
  - Read-only; never reports C(changed).
version_added: "0.1.0"
author: Stockade contributors (!UNKNOWN)
extends_documentation_fragment:
  - stockade.fleet.agent.read_only
options:
  gather:
    description:
      - What to read. Omitted means everything.
    type: list
    elements: str
    choices: [health, endpoints, identities, ipcache, policies, counters]
    default: [health, endpoints, identities, ipcache, policies, counters]
"""

EXAMPLES = r"""
- name: Read everything the agent knows
  stockade.fleet.stockade_info:
  register: stockade

- name: Only endpoints, from a non-default socket
  stockade.fleet.stockade_info:
    socket: /run/h1/agent.sock
    gather: [endpoints]
  register: h1

- name: Show the web endpoints' addresses
  ansible.builtin.debug:
    msg: "{{ stockade.endpoints | selectattr('labels.static:app', 'defined') | map(attribute='ips') }}"
"""

RETURN = r"""
health:
  description: The agent's health (GET /v1/health).
  returned: when health is gathered
  type: dict
  sample: {status: ok, policy_revision: 3, endpoints: 2, policies: 4}
policy_revision:
  description: The agent's policy revision.
  returned: when health is gathered
  type: int
  sample: 3
endpoints:
  description: Every endpoint with its name, interface, IPs, labels (source-prefixed keys), identity and state.
  returned: when endpoints are gathered
  type: list
  elements: dict
identities:
  description: The identities the agent has allocated.
  returned: when identities are gathered
  type: list
  elements: dict
ipcache:
  description: Every ipcache entry (local, remote, cidr, host).
  returned: when ipcache is gathered
  type: list
  elements: dict
policies:
  description: The live policies (kind, namespace, name, source, document, rules).
  returned: when policies are gathered
  type: list
  elements: dict
counters:
  description:
    - Packet counters by direction, verdict and reason, from the agent's metrics.
    - C(dropped) and C(forwarded) are totals over every direction and reason.
  returned: when counters are gathered
  type: dict
  sample: {dropped: 12, forwarded: 340, samples: [{direction: ingress, verdict: drop, reason: policy, packets: 12}]}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stockade.fleet.plugins.module_utils.stockade import (
    SOCKET_ARG, AgentClient, StockadeModuleError, fail, parse_metrics,
)

GATHER = ["health", "endpoints", "identities", "ipcache", "policies", "counters"]


def counters(text):
    samples, dropped, forwarded = [], 0, 0
    for s in parse_metrics(text):
        if s["name"] not in ("stockade_packets_total", "stockade_packets"):
            continue
        lab = s["labels"]
        n = int(s["value"])
        samples.append({"direction": lab.get("direction"), "verdict": lab.get("verdict"),
                        "reason": lab.get("reason"), "packets": n})
        verdict = (lab.get("verdict") or "").lower()
        if verdict.startswith("drop"):
            dropped += n
        elif verdict.startswith("forward") or verdict == "allow":
            forwarded += n
    return {"dropped": dropped, "forwarded": forwarded, "samples": samples}


ARGUMENT_SPEC = dict(
    gather=dict(type="list", elements="str", choices=GATHER, default=list(GATHER)),
    **SOCKET_ARG)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
    )
    client = AgentClient(module.params["socket"])
    result = dict(changed=False)
    try:
        for what in module.params["gather"]:
            if what == "health":
                result["health"] = client.health()
                result["policy_revision"] = result["health"].get("policy_revision")
            elif what == "counters":
                result["counters"] = counters(client.metrics())
            else:
                result[what] = getattr(client, what)()
    except StockadeModuleError as exc:
        fail(module, exc)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
