#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Stockade contributors
# SPDX-License-Identifier: Apache-2.0 OR GPL-3.0-or-later
# Apache License 2.0, or (at your option) the GNU General Public License v3.0+
# (see https://www.apache.org/licenses/LICENSE-2.0 and https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: stockade_services
short_description: Make a Stockade agent's service definitions equal to a mapping
description:
  - Services give identities to workloads by matching them (container name or image glob,
    container label selector, libvirt domain, static endpoint name, interface glob), and
    to machines outside the fleet by CIDR; see docs/services.md. Matching workloads get
    the service's labels without being restarted.
  - The agent's definitions become exactly O(services); services that are not given are
    removed. An empty mapping removes every service.
  - The agent is always asked for a dry run first. The module reports C(changed) only when
    a definition changes or a workload would be relabelled; in diff mode it shows the
    definitions that change and the workloads that get new labels.
  - Workloads that match more than one service are returned in RV(conflicts) and warned
    about; the agent gives them the first service by name.
version_added: "0.1.0"
author: Stockade contributors (!UNKNOWN)
extends_documentation_fragment:
  - stockade.fleet.agent
options:
  services:
    description:
      - Service name -> definition with C(labels) (a mapping; C(service=<name>) is added
        by the agent), C(members) (a list of mappings, each with one matcher of
        C(container_name), C(image), C(container_labels), C(libvirt_domain), C(endpoint),
        C(interface)) and/or C(cidrs) (a list of prefixes).
      - C(hosts) keys (on a service or a member) are for the C(stockade_policy) role, which
        resolves them on the controller; this module drops them before sending.
      - The agent validates the definitions; an error names the field, for example
        C(services.web.members[0]), and nothing changes.
    type: dict
    required: true
notes:
  - Push services before the policies that select them; the C(stockade_policy) role does.
"""

EXAMPLES = r"""
- name: The database container by name, a backup appliance by CIDR
  stockade.fleet.stockade_services:
    services:
      db:
        labels: {tier: data}
        members:
          - container_name: "db-*"
      backup:
        labels: {tier: storage}
        cidrs: [192.0.2.0/24]

- name: Remove every service definition
  stockade.fleet.stockade_services:
    services: {}
"""

RETURN = r"""
services:
  description: The definitions the agent holds after the change (as given, in check mode).
  returned: always
  type: dict
  sample: {db: {labels: {tier: data}, members: [{container_name: "db-*"}]}}
relabeled:
  description: Workloads whose labels change (or would, in check mode), with the service they get (null when they leave every service) and their new labels.
  returned: always
  type: list
  elements: dict
  sample: [{endpoint: demo-db, service: db, labels: ["podman:app=db", "service:service=db"]}]
conflicts:
  description: Workloads that match several services, the services and the one chosen (first by name).
  returned: always
  type: list
  elements: dict
  sample: [{endpoint: demo-db, services: [db, storage], chosen: db}]
"""

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stockade.fleet.plugins.module_utils.stockade import (
    SOCKET_ARG, AgentClient, AgentRefused, StockadeModuleError, fail,
)


def without_hosts(services):
    """The definitions as the agent stores them: ``hosts`` is resolved on the controller."""
    out = {}
    for name, d in services.items():
        if not isinstance(d, dict):
            out[name] = d  # the agent's validation names the field
            continue
        d = {k: v for k, v in d.items() if k != "hosts"}
        if isinstance(d.get("members"), list):
            d["members"] = [{k: v for k, v in m.items() if k != "hosts"}
                            if isinstance(m, dict) else m for m in d["members"]]
        out[name] = d
    return out


def definition_text(services):
    return "".join("%s: %s\n" % (name, json.dumps(services[name], sort_keys=True))
                   for name in sorted(services))


def diff_text(before, after, relabeled):
    removed = {n: d for n, d in before.items() if after.get(n) != d}
    added = {n: d for n, d in after.items() if before.get(n) != d}
    moves = "".join("relabel %s -> %s: %s\n" % (r["endpoint"], r.get("service") or "(no service)",
                                                ", ".join(r.get("labels") or []))
                    for r in relabeled)
    return {"before": definition_text(removed), "after": definition_text(added) + moves,
            "before_header": "service definitions (that go or change)",
            "after_header": "service definitions (that come or change) and relabelled workloads"}


ARGUMENT_SPEC = dict(
    services=dict(type="dict", required=True),
    **SOCKET_ARG)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    p = module.params
    want = without_hosts(p["services"])
    client = AgentClient(p["socket"])
    try:
        live = {s["name"]: s.get("definition") or {} for s in client.services()["services"]}
        try:
            result = client.put_services(want, dry_run=True)
            if result["changed"] and not module.check_mode:
                result = client.put_services(want, dry_run=False)
        except AgentRefused as exc:
            if exc.field and exc.field not in exc.msg:
                exc.msg = "%s: %s" % (exc.field, exc.msg)
            raise
    except StockadeModuleError as exc:
        fail(module, exc)
    for c in result.get("conflicts") or []:
        module.warn("endpoint %s matches services %s; the agent gives it %s (first by name)"
                    % (c["endpoint"], ", ".join(c["services"]), c["chosen"]))
    out = dict(changed=bool(result["changed"]), services=want if result["changed"] else live,
               relabeled=result.get("relabeled") or [], conflicts=result.get("conflicts") or [])
    if module._diff:
        out["diff"] = diff_text(live, want, out["relabeled"])
    module.exit_json(**out)


if __name__ == "__main__":
    main()
