#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Stockade contributors
# SPDX-License-Identifier: Apache-2.0 OR GPL-3.0-or-later
# Apache License 2.0, or (at your option) the GNU General Public License v3.0+
# (see https://www.apache.org/licenses/LICENSE-2.0 and https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: stockade_ipcache
short_description: Make a Stockade agent's remote ipcache entries equal to a list
description:
  - The ipcache maps addresses of workloads on other hosts to the identity of their
    labels, so that C(fromEndpoints) and C(toEndpoints) rules match them.
  - Entries are given directly (O(entries)) or as other hosts' endpoints, as
    M(stockade.fleet.stockade_info) returns them (O(endpoints_by_host)); both may be given.
  - With O(purge=true) (the default) remote entries that are not in the list are removed,
    so the remote set becomes exactly the list. Local, CIDR and host entries are never touched.
version_added: "0.1.0"
author: Stockade contributors (!UNKNOWN)
extends_documentation_fragment:
  - stockade.fleet.agent
options:
  entries:
    description: Remote entries.
    type: list
    elements: dict
    default: []
    suboptions:
      prefix:
        description: An address (becomes a /32 or /128) or a CIDR prefix.
        type: str
        required: true
      labels:
        description: Labels of the remote workload. Keys without a source get C(remote:). Required unless O(entries[].node=true).
        type: dict
        default: {}
      host:
        description: The host the workload runs on. Omitted means unknown.
        type: str
      node:
        description: The prefix is another host's own address (identity remote-node).
        type: bool
        default: false
  endpoints_by_host:
    description:
      - Host name to that host's endpoints (dicts with C(ips) and C(labels), as
        M(stockade.fleet.stockade_info) returns them). Each address becomes an entry with the endpoint's
        labels and the host name.
      - Endpoints without addresses or labels are skipped.
    type: dict
    default: {}
  purge:
    description: Remove remote entries that are not in the list.
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Two remote workloads, nothing else
  stockade.fleet.stockade_ipcache:
    entries:
      - {prefix: 10.77.2.10, labels: {app: db}, host: host2}
      - {prefix: 10.77.3.0/24, labels: {app: batch}, host: host3}

- name: Every other host's endpoints (see the playbook stockade.fleet.site)
  stockade.fleet.stockade_ipcache:
    endpoints_by_host: "{{ peers }}"

- name: Forget every remote entry
  stockade.fleet.stockade_ipcache:
    entries: []
"""

RETURN = r"""
added:
  description: Prefixes added or updated.
  returned: always
  type: list
  elements: str
  sample: [10.77.2.10/32]
removed:
  description: Prefixes removed (only with purge).
  returned: always
  type: list
  elements: str
entries:
  description: The desired remote entries, normalized.
  returned: always
  type: list
  elements: dict
"""

import ipaddress

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stockade.fleet.plugins.module_utils.stockade import (
    SOCKET_ARG, AgentClient, AgentRefused, StockadeModuleError, fail, label_strings,
)

NODE_LABEL = "reserved:remote-node"


def norm_prefix(module, value, where):
    try:
        return str(ipaddress.ip_network(str(value).strip(), strict=True))
    except ValueError as exc:
        module.fail_json(msg="%s: %r is not an IP address or prefix (%s); host bits must be "
                             "zero in a prefix" % (where, value, exc))


def desired_entries(module):
    p = module.params
    out = {}
    for i, e in enumerate(p["entries"]):
        where = "entries[%d]" % i
        prefix = norm_prefix(module, e["prefix"], where + ".prefix")
        labels = {k: "" if v is None else str(v) for k, v in (e.get("labels") or {}).items()}
        if not labels and not e.get("node"):
            module.fail_json(msg="%s.labels: give the remote workload's labels "
                                 "(or node: true for another host's own address)" % where)
        out[prefix] = {"prefix": prefix, "labels": labels, "host": e.get("host"),
                       "node": bool(e.get("node"))}
    for host in sorted(p["endpoints_by_host"]):
        eps = p["endpoints_by_host"][host] or []
        if not isinstance(eps, list):
            module.fail_json(msg="endpoints_by_host.%s: must be a list of endpoints "
                                 "(stockade_info's endpoints)" % host)
        for j, ep in enumerate(eps):
            if not isinstance(ep, dict):
                module.fail_json(msg="endpoints_by_host.%s[%d]: must be an endpoint dict" % (host, j))
            labels = ep.get("labels") or {}
            for ip in ep.get("ips") or []:
                if not labels:
                    continue
                prefix = norm_prefix(module, ip, "endpoints_by_host.%s[%d].ips" % (host, j))
                if prefix in out and out[prefix]["host"] != host:
                    module.fail_json(msg="%s is claimed by hosts %s and %s: workload subnets "
                                         "must not overlap between hosts (docs/multihost.md)"
                                     % (prefix, out[prefix]["host"], host))
                out[prefix] = {"prefix": prefix, "host": host, "node": False,
                               "labels": {str(k): "" if v is None else str(v)
                                          for k, v in labels.items()}}
    return out


def same(entry, cur):
    if entry["node"]:
        return NODE_LABEL in cur["labels"] and cur.get("host") == entry["host"]
    return (sorted(cur["labels"]) == label_strings(entry["labels"], "remote")
            and cur.get("host") == entry["host"])


def line(prefix, labels, host):
    return "%s %s host=%s\n" % (prefix, ",".join(labels), host or "-")


ARGUMENT_SPEC = dict(
    entries=dict(type="list", elements="dict", default=[], options=dict(
        prefix=dict(type="str", required=True),
        labels=dict(type="dict", default={}),
        host=dict(type="str"),
        node=dict(type="bool", default=False))),
    endpoints_by_host=dict(type="dict", default={}),
    purge=dict(type="bool", default=True),
    **SOCKET_ARG)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
    )
    want = desired_entries(module)
    client = AgentClient(module.params["socket"])
    try:
        live = client.ipcache()
        remote = {e["prefix"]: e for e in live if e["source"] == "remote"}
        others = {e["prefix"]: e for e in live if e["source"] != "remote"}
        for prefix in want:
            if prefix in others:
                module.fail_json(msg="%s is a %s address of this host, not a remote workload; "
                                     "remove it from the list" % (prefix, others[prefix]["source"]))
        add = sorted(p for p, e in want.items() if p not in remote or not same(e, remote[p]))
        remove = sorted(p for p in remote if p not in want) if module.params["purge"] else []
        result = dict(changed=bool(add or remove), added=add, removed=remove,
                      entries=[want[p] for p in sorted(want)])
        if module._diff:
            before = "".join(line(p, sorted(e["labels"]), e.get("host"))
                             for p, e in sorted(remote.items()))
            kept = {p: e for p, e in remote.items() if p not in remove and p not in add}
            after_items = [(p, sorted(e["labels"]), e.get("host")) for p, e in kept.items()]
            after_items += [(p, [NODE_LABEL] if want[p]["node"]
                             else label_strings(want[p]["labels"], "remote"), want[p]["host"])
                            for p in add]
            after = "".join(line(*i) for i in sorted(after_items))
            result["diff"] = dict(before=before, after=after, before_header="remote ipcache",
                                  after_header="remote ipcache")
        if not module.check_mode:
            for p in remove:
                try:
                    client.remove_ipcache(p)
                except AgentRefused as exc:
                    if exc.status != 404:
                        raise
            for p in add:
                e = want[p]
                body = {"prefix": p, "host": e["host"]}
                if e["node"]:
                    body["node"] = True
                if e["labels"]:
                    body["labels"] = e["labels"]
                client.add_ipcache(body)
    except StockadeModuleError as exc:
        fail(module, exc)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
