# -*- coding: utf-8 -*-
# Copyright: Stockade contributors
# SPDX-License-Identifier: Apache-2.0 OR GPL-3.0-or-later
# Apache License 2.0, or (at your option) the GNU General Public License v3.0+
# (see https://www.apache.org/licenses/LICENSE-2.0 and https://www.gnu.org/licenses/gpl-3.0.txt)
"""stockade_services_for: narrow a stockade_services mapping to one inventory host.

``hosts:`` (a group or host name, or a list of them) on a member keeps that member only
for hosts in those groups or with those names; on a service it is the default for the
service's members. CIDRs are not narrowed (a CIDR identity is wanted on every host). A
service left with no members and no CIDRs on a host is not sent to that host.
"""
from __future__ import annotations

from ansible.errors import AnsibleFilterError


def _names(value, path, groups):
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise AnsibleFilterError("%s: give an inventory group or host name, or a list of them" % path)
    return names


def _applies(names, path, hostname, groups):
    hit = False
    for n in names:
        known = n in groups or any(n in hs for hs in groups.values())
        if not known:
            raise AnsibleFilterError("%s: %r is neither an inventory group nor a host" % (path, n))
        hit = hit or n == hostname or hostname in groups.get(n, [])
    return hit


def stockade_services_for(services, hostname, groups):
    if not services:
        return {}
    if not isinstance(services, dict):
        raise AnsibleFilterError("stockade_services: a mapping of service name -> definition")
    out = {}
    for name, d in services.items():
        if not isinstance(d, dict):
            out[name] = d  # the agent's validation names the field
            continue
        path = "stockade_services.%s" % name
        default = d.get("hosts")
        if default is not None:
            default = _names(default, path + ".hosts", groups)
        members = []
        for i, m in enumerate(d.get("members") or []):
            where = m.get("hosts") if isinstance(m, dict) and m.get("hosts") is not None else None
            mpath = "%s.members[%d].hosts" % (path, i)
            names = _names(where, mpath, groups) if where is not None else default
            if names is not None and not _applies(names, mpath if where is not None else path + ".hosts",
                                                  hostname, groups):
                continue
            members.append({k: v for k, v in m.items() if k != "hosts"} if isinstance(m, dict) else m)
        new = {k: v for k, v in d.items() if k not in ("hosts", "members")}
        if members:
            new["members"] = members
        if not members and not d.get("cidrs") and d.get("members"):
            continue  # no member on this host
        out[name] = new
    return out


class FilterModule:
    def filters(self):
        return {"stockade_services_for": stockade_services_for}
