#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Stockade contributors
# SPDX-License-Identifier: Apache-2.0 OR GPL-3.0-or-later
# Apache License 2.0, or (at your option) the GNU General Public License v3.0+
# (see https://www.apache.org/licenses/LICENSE-2.0 and https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: stockade_endpoint
short_description: Register or remove a static Stockade endpoint
description:
  - Registers a workload that Stockade does not discover by itself (a VM's tap, a network
    namespace's veth) with the agent, with the labels that give it its identity.
  - A VM is given by its tap's name (O(interface)) or by its guest MAC (O(mac) without
    O(interface)); by MAC, the agent binds the endpoint to the tap whose host-side MAC is
    the guest MAC with the first octet replaced by C(fe) (or equal to it), whatever the
    tap's name, and again whenever the VM restarts on a new tap (docs/vms.md).
  - Registering the same spec again changes nothing; a different spec for the same name
    replaces the old one. The spec is compared as the agent normalizes it (MAC in lower
    case, addresses sorted, labels with their source); labels the endpoint gets from an
    inventory service (source C(service)) are not part of its spec.
version_added: "0.1.0"
author: Stockade contributors (!UNKNOWN)
extends_documentation_fragment:
  - stockade.fleet.agent
options:
  name:
    description: Endpoint name, unique on this host (letters, digits, C(_), C(.), C(-); at most 63).
    type: str
    required: true
  state:
    description: Whether the endpoint should be registered.
    type: str
    choices: [present, absent]
    default: present
  interface:
    description:
      - Host-side interface of the workload (veth, tap), at most 15 characters.
      - With O(state=present), O(interface) or O(mac) (or both) is required. Omitted with
        O(mac) given means the tap is found from the MAC.
    type: str
  ips:
    description: The workload's addresses; at least one.
    type: list
    elements: str
  labels:
    description:
      - Labels that give the identity. Keys without a source get C(static:).
      - A key naming another source (C(container:), C(libvirt:), C(service:), C(k8s:) ...)
        is dropped by the agent, which lists it in the endpoint's C(dropped_labels); the
        module warns and leaves it out of the compared spec. C(reserved:) keys are refused.
      - Omitted means no labels.
    type: dict
    default: {}
  audit:
    description: Log what policy would drop for this endpoint, drop nothing.
    type: bool
    default: false
  mac:
    description:
      - The VM's guest MAC address (C(52:54:00:12:34:56)). Without O(interface) the
        endpoint is bound to the tap found from it; with O(interface) it is recorded with
        the endpoint. Omitted means no MAC.
    type: str
notes:
  - O(ips) and one of O(interface) and O(mac) are required with O(state=present).
  - Only static endpoints can be removed; container endpoints go when the container stops.
"""

EXAMPLES = r"""
- name: A VM on tap0 is the reports service
  stockade.fleet.stockade_endpoint:
    name: reports-vm
    interface: tap0
    ips: [10.90.0.2]
    labels: {app: reports}

- name: A Firecracker VM found by its guest MAC, whatever its tap is called
  stockade.fleet.stockade_endpoint:
    name: build-fc
    mac: "06:00:ac:10:00:02"
    ips: [10.90.0.3]
    labels: {app: build}

- name: Forget it
  stockade.fleet.stockade_endpoint:
    name: reports-vm
    state: absent
"""

RETURN = r"""
endpoint:
  description: The endpoint as the agent reports it after the change (or as it would be, in check mode); absent when removed.
  returned: when state is present
  type: dict
  sample: {name: reports-vm, interface: tap0, ips: [10.90.0.2], labels: {"static:app": reports}, state: ready}
diff:
  description: The endpoint's spec before and after.
  returned: when diff mode is on
  type: dict
"""

import ipaddress
import json
import re

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stockade.fleet.plugins.module_utils.stockade import (
    SOCKET_ARG, AgentClient, AgentRefused, StockadeModuleError, fail, with_source,
)


MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


def comparable(ep):
    """The fields a static spec sets, in the agent's normalized form. An endpoint bound by
    MAC has no interface in its spec (the agent reports the tap it found, or "")."""
    if ep is None:
        return None
    by_mac = ep.get("by_mac", bool(ep.get("mac")) and not ep.get("interface"))
    return {"name": ep["name"], "interface": None if by_mac else ep["interface"],
            "ips": sorted(ep["ips"]),
            "labels": dict(sorted((k, v) for k, v in ep["labels"].items()
                                  if not k.startswith("service:"))),
            "audit": bool(ep.get("audit")), "mac": (ep.get("mac") or "").lower() or None}


def text(spec):
    return "" if spec is None else json.dumps(spec, indent=2, sort_keys=True) + "\n"


ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", choices=["present", "absent"], default="present"),
    interface=dict(type="str"),
    ips=dict(type="list", elements="str"),
    labels=dict(type="dict", default={}),
    audit=dict(type="bool", default=False),
    mac=dict(type="str"),
    **SOCKET_ARG)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        required_if=[("state", "present", ("interface", "mac"), True),
                     ("state", "present", ("ips",))],
        supports_check_mode=True,
    )
    p = module.params
    client = AgentClient(p["socket"])
    try:
        current = next((e for e in client.endpoints() if e["name"] == p["name"]), None)
        if current is not None and current.get("source") != "static" and p["state"] == "absent":
            module.fail_json(msg="endpoint %s comes from %s, not from a static spec; stop the "
                                 "workload to remove it" % (p["name"], current.get("source")))
        before = comparable(current)
        if p["state"] == "absent":
            after = None
        else:
            iface, mac = p["interface"], p["mac"]
            if iface is not None and (not iface or len(iface) > 15 or "/" in iface
                                      or any(c.isspace() for c in iface)):
                module.fail_json(msg="interface: %r is not a host interface name (1 to 15 "
                                     "characters, no '/' or spaces)" % iface)
            if mac is not None and not MAC_RE.match(mac):
                module.fail_json(msg="mac: %r is not a MAC address (six hex pairs with ':', "
                                     "e.g. 52:54:00:12:34:56)" % mac)
            ips = []
            for ip in p["ips"]:
                try:
                    ips.append(str(ipaddress.ip_address(ip.strip())))
                except ValueError:
                    module.fail_json(msg="ips: %r is not an IP address (give addresses, "
                                         "not prefixes)" % ip)
            if not ips:
                module.fail_json(msg="ips: give at least one address of the workload")
            spec = {"name": p["name"], "ips": ips,
                    "labels": {k: "" if v is None else str(v) for k, v in p["labels"].items()},
                    "audit": p["audit"]}
            if iface:
                spec["interface"] = iface
            if mac:
                spec["mac"] = mac.lower()
            for k in sorted(spec["labels"]):
                if ":" in k and k.split(":", 1)[0] not in ("static", "reserved"):
                    module.warn("labels.%s: a static endpoint's labels have source static; "
                                "the agent drops this one (see the endpoint's dropped_labels)" % k)
            after = {"name": p["name"], "interface": iface, "ips": sorted(ips),
                     "labels": dict(sorted((k, v) for k, v in with_source(spec["labels"], "static").items()
                                           if k.split(":", 1)[0] in ("static", "reserved"))),
                     "audit": p["audit"], "mac": mac.lower() if mac else None}
        changed = before != after
        result = dict(changed=changed)
        if module._diff:
            result["diff"] = dict(before=text(before), after=text(after),
                                  before_header="endpoint %s" % p["name"],
                                  after_header="endpoint %s" % p["name"])
        if p["state"] == "present":
            result["endpoint"] = current if not changed else dict(current or {}, **after)
        if changed and not module.check_mode:
            if p["state"] == "absent":
                try:
                    client.remove_endpoint(p["name"])
                except AgentRefused as exc:
                    if exc.status != 404:
                        raise
            else:
                # The agent updates an endpoint in place, in one transaction (the new
                # identity and entries first, then the old ones go). A conflict (the name
                # belongs to a runtime's endpoint, the interface to another endpoint) is
                # the agent's answer, never worked around by removing and re-adding: that
                # would leave the interface open in between.
                result["endpoint"] = client.add_endpoint(spec)
    except StockadeModuleError as exc:
        fail(module, exc)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
