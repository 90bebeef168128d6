#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Stockade contributors
# SPDX-License-Identifier: Apache-2.0 OR GPL-3.0-or-later
# Apache License 2.0, or (at your option) the GNU General Public License v3.0+
# (see https://www.apache.org/licenses/LICENSE-2.0 and https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
---
module: stockade_policy
short_description: Apply or remove CiliumNetworkPolicy documents on a Stockade agent
description:
  - Sends policy documents to the Stockade agent on the managed host. The agent validates
    them as one set; any error and nothing changes.
  - The agent is always asked for a dry run first. The module reports C(changed) only when
    the realized policy changes, and shows rule-level changes in diff mode.
  - Documents come inline (O(documents)), from files on the managed host (O(src)), or as
    file contents (O(content), what the C(stockade_policy) role sends from the controller).
    All three may be combined.
  - Uses only the Python standard library on the managed host (PyYAML only for
    O(state=absent) with YAML files or contents).
version_added: "0.1.0"
author: Stockade contributors (!UNKNOWN)
extends_documentation_fragment:
  - stockade.fleet.agent
options:
  state:
    description:
      - C(present) adds or updates the documents; C(absent) deletes the policies they name
        (kind, namespace and name), whatever their live content.
      - Both states take every input shape the agent takes, single documents, several
        YAML documents in one file, JSON lists and documents of kind C(List) with C(items).
    type: str
    choices: [present, absent]
    default: present
  documents:
    description: Policy documents (CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy) as dicts.
    type: list
    elements: dict
    default: []
  src:
    description: Policy files on the managed host (YAML, several documents each; C(.json) means JSON).
    type: list
    elements: path
    default: []
  content:
    description: Policy files given as their name and text.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The file's name, shown in errors and as the policies' source.
        type: str
        required: true
      text:
        description: The file's text.
        type: str
        required: true
  replace_all:
    description:
      - Make the live set exactly the given documents; live policies that are not given are
        removed. Only with O(state=present).
      - An empty set (no documents at all, or files that hold none) is refused unless
        O(allow_empty=true), since a misspelt variable or a missing file must not remove every
        policy on the host.
    type: bool
    default: false
  allow_empty:
    description:
      - With O(replace_all=true), allow an empty set of documents, which removes every live
        policy.
    type: bool
    default: false
notes:
  - Validate on the controller first (C(stockade policy validate)); the C(stockade_policy)
    role does so before it changes any host.
"""

EXAMPLES = r"""
- name: One inline policy
  stockade.fleet.stockade_policy:
    documents:
      - apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: db}
        spec:
          endpointSelector: {matchLabels: {app: db}}
          ingress:
            - fromEndpoints: [{matchLabels: {app: web}}]
              toPorts: [{ports: [{port: "5432", protocol: TCP}]}]

- name: Exactly the inventory's policies, read on the controller
  stockade.fleet.stockade_policy:
    content:
      - name: shop.yaml
        text: "{{ lookup('ansible.builtin.file', inventory_dir ~ '/policies/shop.yaml') }}"
    replace_all: true

- name: Remove the policies in a file on the host
  stockade.fleet.stockade_policy:
    src: [/etc/stockade/policies/old.yaml]
    state: absent

- name: Remove every policy on the host (an empty set must be asked for)
  stockade.fleet.stockade_policy:
    replace_all: true
    allow_empty: true
"""

RETURN = r"""
revision:
  description: The agent's policy revision after the change (unchanged in check mode).
  returned: always
  type: int
  sample: 7
policy_diff:
  description: The agent's diff (policies added, removed and changed; rules added and removed; map entries).
  returned: always
  type: dict
  sample: {added: [db], removed: [], changed: [], rules: {added: ["db: ingress ..."], removed: []}}
"""

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.stockade.fleet.plugins.module_utils.stockade import (
    SOCKET_ARG, AgentClient, AgentRefused, StockadeModuleError, fail,
)

EMPTY = {"added": [], "removed": [], "changed": [], "rules": {"added": [], "removed": []},
         "entries": {"added": 0, "removed": 0}}


def doc_name(doc, i):
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") or "document-%d" % i
    ns = meta.get("namespace")
    return "inline/%s%s.json" % (ns + "/" if ns else "", name)


def gather_files(module):
    p = module.params
    files = []
    for i, doc in enumerate(p["documents"]):
        files.append({"name": doc_name(doc, i), "text": json.dumps(doc, sort_keys=True)})
    for path in p["src"]:
        try:
            with open(path) as f:
                files.append({"name": path, "text": f.read()})
        except (OSError, UnicodeDecodeError) as exc:
            module.fail_json(msg="src: cannot read %s on the managed host: %s" % (path, exc))
    for c in p["content"]:
        files.append({"name": c["name"], "text": c["text"]})
    return files


def expand(doc):
    """The policy documents in one parsed document, as the agent's loader reads them: a
    JSON or YAML list, a kind: List with items, or one document."""
    if isinstance(doc, list):
        return [d for item in doc for d in expand(item)]
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        return expand(doc["items"])
    return [doc]


def parse(module, f):
    """Every document of a file (name, text), JSON for .json, YAML otherwise."""
    if f["name"].endswith(".json"):
        try:
            return [json.loads(f["text"])]
        except ValueError as exc:
            module.fail_json(msg="%s: cannot parse as JSON: %s" % (f["name"], exc))
    try:
        import yaml
    except ImportError:
        module.fail_json(msg="state=absent with YAML files needs PyYAML on the managed "
                             "host (python3-yaml); or give the documents inline")
    try:
        return [d for d in yaml.safe_load_all(f["text"]) if d is not None]
    except yaml.YAMLError as exc:
        module.fail_json(msg="%s: cannot parse: %s" % (f["name"], exc))


def refs(module, files):
    """(kind, namespace, name) of every document, for state=absent."""
    out = []
    for f in files:
        docs = [d for doc in parse(module, f) for d in expand(doc)]
        for i, d in enumerate(docs):
            meta = d.get("metadata") if isinstance(d, dict) else None
            if not isinstance(meta, dict) or not meta.get("name"):
                module.fail_json(msg="%s: document %d: metadata.name is required to know what "
                                     "to delete" % (f["name"], i))
            out.append((d.get("kind"), meta.get("namespace"), meta["name"]))
    return out


def merge(a, b):
    out = {k: sorted(set(a.get(k, [])) | set(b.get(k, []))) for k in ("added", "removed", "changed")}
    out["rules"] = {k: sorted(set(a["rules"].get(k, [])) | set(b["rules"].get(k, [])))
                    for k in ("added", "removed")}
    out["entries"] = {k: a["entries"].get(k, 0) + b["entries"].get(k, 0)
                      for k in ("added", "removed")}
    return out


def diff_text(d):
    before = ["policy %s\n" % n for n in d["removed"]] + \
             ["policy %s (changed)\n" % n for n in d["changed"]] + \
             ["%s\n" % r for r in d["rules"]["removed"]]
    after = ["policy %s\n" % n for n in d["added"]] + \
            ["policy %s (changed)\n" % n for n in d["changed"]] + \
            ["%s\n" % r for r in d["rules"]["added"]]
    return {"before": "".join(before), "after": "".join(after),
            "before_header": "live policy (rules that go)",
            "after_header": "live policy (rules that come)"}


EMPTY_SET = ("replace_all with an empty set of policies would remove every policy on the "
             "host; give the policies (check the variable and the files), or allow_empty=true "
             "to mean it")


def present(module, client, files):
    replace_all = module.params["replace_all"]
    dry = client.put_policies(files, replace_all=replace_all, dry_run=True)
    if replace_all and not module.params["allow_empty"]:
        # The agent parsed every shape: the set is empty when nothing would be added or
        # changed and every live policy would go (then no given policy is live after).
        d = dry["diff"]
        if not d["added"] and not d["changed"] and len(d["removed"]) == len(client.policies()):
            module.fail_json(msg=EMPTY_SET, policy_diff=d)
    if not dry["changed"] or module.check_mode:
        return dry["changed"], dry["revision"], dry["diff"]
    real = client.put_policies(files, replace_all=replace_all, dry_run=False)
    return real["changed"], real["revision"], real["diff"]


def absent(module, client, files):
    changed, diff, revision = False, dict(EMPTY), client.health()["policy_revision"]
    for kind, ns, name in refs(module, files):
        try:
            r = client.delete_policy(name, namespace=ns, kind=kind, dry_run=True)
        except AgentRefused as exc:
            if exc.status == 404:
                continue
            raise
        if not r["changed"]:
            continue
        if not module.check_mode:
            r = client.delete_policy(name, namespace=ns, kind=kind)
        changed, revision = changed or r["changed"], r["revision"]
        diff = merge(diff, r["diff"])
    return changed, revision, diff


ARGUMENT_SPEC = dict(
    state=dict(type="str", choices=["present", "absent"], default="present"),
    documents=dict(type="list", elements="dict", default=[]),
    src=dict(type="list", elements="path", default=[]),
    content=dict(type="list", elements="dict", default=[], no_log=False, options=dict(
        name=dict(type="str", required=True),
        text=dict(type="str", required=True))),
    replace_all=dict(type="bool", default=False),
    allow_empty=dict(type="bool", default=False),
    **SOCKET_ARG)


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
    )
    p = module.params
    if p["state"] == "absent" and p["replace_all"]:
        module.fail_json(msg="replace_all goes with state=present; to remove every policy give "
                             "state=present, replace_all=true and no documents")
    files = gather_files(module)
    if not files and not p["replace_all"]:
        module.fail_json(msg="give documents, src or content (or replace_all=true and "
                             "allow_empty=true with none, to remove every policy)")
    if not files and not p["allow_empty"]:
        module.fail_json(msg=EMPTY_SET)
    client = AgentClient(p["socket"])
    try:
        if p["state"] == "present":
            changed, revision, diff = present(module, client, files)
        else:
            changed, revision, diff = absent(module, client, files)
    except StockadeModuleError as exc:
        fail(module, exc, files=[f["name"] for f in files])
    result = dict(changed=changed, revision=revision, policy_diff=diff)
    if module._diff:
        result["diff"] = diff_text(diff)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
