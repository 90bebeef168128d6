"""The Stockade modules against a fake agent on a real unix socket: check mode changes
nothing, diff shows what changes, a second run is not changed, bad input says what to fix."""
import json
from pathlib import Path

import pytest

WEB = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
       "metadata": {"name": "db"},
       "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}],
                             "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]}}
OTHER_TEXT = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other}
spec: {endpointSelector: {matchLabels: {app: other}}, egress: [{}]}
"""
BAD_TEXT = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad}
spec:
  endpointSelector: {}
  ingress:
    - toPorts: [{ports: [{port: "http2"}]}]
"""


def s(agent, **kw):
    return dict(kw, socket=agent.socket_path)


# ---------------------------------------------------------------- stockade_policy

def test_policy_check_mode_changes_nothing(agent, run):
    r = run("stockade_policy", s(agent, documents=[WEB]), check=True, diff=True)
    assert r["changed"] and r["policy_diff"]["added"] == ["db"]
    assert "policy db" in r["diff"]["after"]
    assert agent.policies == {}


def test_policy_apply_then_idempotent(agent, run):
    r = run("stockade_policy", s(agent, documents=[WEB]), diff=True)
    assert r["changed"] and r["revision"] == agent.revision
    assert [k[2] for k in agent.policies] == ["db"]
    r2 = run("stockade_policy", s(agent, documents=[WEB]), diff=True)
    assert not r2["changed"] and r2["revision"] == r["revision"]
    assert r2["diff"]["before"] == r2["diff"]["after"] == ""


def test_policy_rule_level_diff_on_change(agent, run):
    run("stockade_policy", s(agent, documents=[WEB]))
    changed = {**WEB, "spec": {**WEB["spec"], "ingress": []}}
    r = run("stockade_policy", s(agent, documents=[changed]), diff=True)
    assert r["changed"] and r["policy_diff"]["changed"] == ["db"]
    assert "policy db (changed)" in r["diff"]["after"]


def test_policy_replace_all_removes_unlisted(agent, run):
    run("stockade_policy", s(agent, documents=[WEB]))
    r = run("stockade_policy", s(agent, content=[{"name": "other.yaml", "text": OTHER_TEXT}],
                                 replace_all=True), diff=True)
    assert r["changed"] and r["policy_diff"]["removed"] == ["db"]
    assert r["policy_diff"]["added"] == ["other"]
    assert [k[2] for k in agent.policies] == ["other"]


def test_policy_src_file_and_absent(agent, run, tmp_path):
    f = tmp_path / "other.yaml"
    f.write_text(OTHER_TEXT)
    assert run("stockade_policy", s(agent, src=[str(f)]))["changed"]
    r = run("stockade_policy", s(agent, src=[str(f)], state="absent"), check=True)
    assert r["changed"] and agent.policies
    assert run("stockade_policy", s(agent, src=[str(f)], state="absent"))["changed"]
    assert agent.policies == {}
    assert not run("stockade_policy", s(agent, src=[str(f)], state="absent"))["changed"]


@pytest.mark.parametrize("args,msg", [
    ({}, "give documents, src or content"),
    ({"replace_all": True}, "replace_all with an empty set"),
    ({"documents": [WEB], "state": "absent", "replace_all": True}, "replace_all goes with"),
    ({"src": ["/nonexistent/p.yaml"]}, "src: cannot read /nonexistent/p.yaml"),
    ({"content": [{"name": "bad.yaml", "text": BAD_TEXT}]},
     "bad.yaml: spec.ingress[0].toPorts[0].ports[0].port"),
    ({"state": "sideways", "documents": [WEB]}, "state"),
], ids=["nothing", "replace-nothing", "absent-replace", "missing-src", "invalid-policy", "bad-state"])
def test_policy_bad_input(agent, run, args, msg):
    r = run("stockade_policy", s(agent, **args))
    assert r["failed"] and msg in r["msg"], r["msg"]
    assert agent.policies == {}


LIST_SHAPES = {
    "json-list.json": json.dumps([WEB, {**WEB, "metadata": {"name": "db2"}}]),
    "kind-list.yaml": "apiVersion: v1\nkind: List\nitems:\n" + "".join(
        "  - " + json.dumps({**WEB, "metadata": {"name": n}}) + "\n" for n in ("db", "db2")),
    "kind-list.json": json.dumps({"apiVersion": "v1", "kind": "List",
                                  "items": [WEB, {**WEB, "metadata": {"name": "db2"}}]}),
    "multi-doc.yaml": "---\n" + json.dumps(WEB) + "\n---\n" + json.dumps({**WEB, "metadata": {"name": "db2"}}) + "\n",
}


@pytest.mark.parametrize("name", sorted(LIST_SHAPES), ids=sorted(LIST_SHAPES))
def test_policy_every_input_shape_in_both_states(agent, run, name):
    """JSON lists, kind: List (YAML and JSON), multi-document YAML: applied
    with state=present, and every policy they hold removed with state=absent."""
    content = [{"name": name, "text": LIST_SHAPES[name]}]
    r = run("stockade_policy", s(agent, content=content))
    assert r["changed"] and sorted(k[2] for k in agent.policies) == ["db", "db2"], r
    r = run("stockade_policy", s(agent, content=content, state="absent"), check=True)
    assert r["changed"] and len(agent.policies) == 2
    r = run("stockade_policy", s(agent, content=content, state="absent"))
    assert r["changed"] and agent.policies == {}, r
    assert not run("stockade_policy", s(agent, content=content, state="absent"))["changed"]


def test_policy_absent_bad_json_is_a_clear_error(agent, run):
    r = run("stockade_policy", s(agent, content=[{"name": "p.json", "text": "{not json"}], state="absent"))
    assert r["failed"] and r["msg"].startswith("p.json: cannot parse as JSON:"), r["msg"]


@pytest.mark.parametrize("args", [
    {"replace_all": True},
    {"replace_all": True, "content": [{"name": "empty.yaml", "text": "# nothing here\n"}]},
    {"replace_all": True, "content": [{"name": "l.yaml", "text": "kind: List\nitems: []\n"}]},
    {"replace_all": True, "documents": [{"kind": "List", "items": []}]},
], ids=["no-files", "empty-file", "empty-list", "empty-inline-list"])
def test_replace_all_with_an_empty_set_is_refused(agent, run, args):
    """A misspelt variable or a missing file must not wipe the host (issue 20.6): refused,
    in check mode too, and nothing changes; allow_empty=true means it."""
    run("stockade_policy", s(agent, documents=[WEB]))
    for check in (True, False):
        r = run("stockade_policy", s(agent, **args), check=check)
        assert r["failed"] and "replace_all with an empty set of policies" in r["msg"], r
        assert [k[2] for k in agent.policies] == ["db"]
    r = run("stockade_policy", s(agent, **args, allow_empty=True))
    assert r["changed"] and r["policy_diff"]["removed"] == ["db"] and agent.policies == {}
    # on a host with no policies it is refused just the same
    r = run("stockade_policy", s(agent, **args))
    assert r["failed"] and "replace_all with an empty set of policies" in r["msg"]


def test_replace_all_with_policies_that_are_all_live_is_not_empty(agent, run):
    run("stockade_policy", s(agent, documents=[WEB]))
    r = run("stockade_policy", s(agent, documents=[WEB], replace_all=True))
    assert not r.get("failed") and not r["changed"], r


def test_unreachable_agent_names_socket(run, tmp_path):
    r = run("stockade_info", {"socket": str(tmp_path / "none.sock")})
    assert r["failed"] and "none.sock" in r["msg"] and "is the agent running" in r["msg"]


# ---------------------------------------------------------------- stockade_endpoint

EP = {"name": "vm1", "interface": "tap7", "ips": ["10.90.0.2"], "labels": {"app": "reports"}}


def test_endpoint_check_diff_apply_idempotent(agent, run):
    r = run("stockade_endpoint", s(agent, **EP), check=True, diff=True)
    assert r["changed"] and '"static:app": "reports"' in r["diff"]["after"]
    assert agent.endpoints == {}
    assert run("stockade_endpoint", s(agent, **EP))["changed"]
    assert "vm1" in agent.endpoints
    assert not run("stockade_endpoint", s(agent, **EP))["changed"]
    r = run("stockade_endpoint", s(agent, **{**EP, "labels": {"app": "batch"}}), diff=True)
    assert r["changed"] and "reports" in r["diff"]["before"] and "batch" in r["diff"]["after"]
    assert run("stockade_endpoint", s(agent, name="vm1", state="absent"))["changed"]
    assert not run("stockade_endpoint", s(agent, name="vm1", state="absent"))["changed"]


def test_endpoint_conflict_never_removes_then_adds(agent, run):
    """Updating vm2 onto an interface that vm1 holds: the agent answers 409 and the module
    fails with its message; vm2 is neither removed nor re-added (no open gap)."""
    assert run("stockade_endpoint", s(agent, **EP))["changed"]
    vm2 = {**EP, "name": "vm2", "interface": "tap8", "ips": ["10.90.0.3"]}
    assert run("stockade_endpoint", s(agent, **vm2))["changed"]
    before = len(agent.calls)
    r = run("stockade_endpoint", s(agent, **{**vm2, "interface": "tap7"}))
    assert r["failed"] and "already belongs to endpoint vm1" in r["msg"], r
    assert [c[0] for c in agent.calls[before:] if c[0] in ("add_endpoint", "remove_endpoint")] == ["add_endpoint"]
    assert agent.endpoints["vm2"]["interface"] == "tap8" and agent.endpoints["vm1"]["interface"] == "tap7"


VM_MAC = {"name": "build-fc", "mac": "06:00:AC:10:00:02", "ips": ["10.90.0.3"],
          "labels": {"app": "build"}}


def test_endpoint_by_mac_check_diff_apply_idempotent(agent, run):
    r = run("stockade_endpoint", s(agent, **VM_MAC), check=True, diff=True)
    assert r["changed"] and '"mac": "06:00:ac:10:00:02"' in r["diff"]["after"]
    assert agent.endpoints == {}
    assert run("stockade_endpoint", s(agent, **VM_MAC))["changed"]
    ep = agent.endpoints["build-fc"]
    assert ep["mac"] == "06:00:ac:10:00:02" and ep["by_mac"] and ep["interface"] == ""
    assert [c[1] for c in agent.calls if c[0] == "add_endpoint"][-1].get("interface") is None
    # the same MAC in another case, and the tap the agent found, change nothing
    ep["interface"] = "tap-build"
    assert not run("stockade_endpoint", s(agent, **{**VM_MAC, "mac": "06:00:ac:10:00:02"}))["changed"]
    # pinning it to a tap by name is a change of spec
    r = run("stockade_endpoint", s(agent, **{**VM_MAC, "interface": "tap-build"}), diff=True)
    assert r["changed"] and '"interface": null' in r["diff"]["before"]
    assert agent.endpoints["build-fc"]["interface"] == "tap-build"
    assert not agent.endpoints["build-fc"]["by_mac"]
    assert not run("stockade_endpoint", s(agent, **{**VM_MAC, "interface": "tap-build"}))["changed"]


def test_endpoint_service_labels_are_not_its_spec(agent, run):
    run("stockade_endpoint", s(agent, **EP))
    agent.set_services({"reports": {"members": [{"endpoint": "vm1"}]}})  # a service labels it
    assert agent.endpoints["vm1"]["labels"]["service:service"] == "reports"
    assert not run("stockade_endpoint", s(agent, **EP))["changed"]


def test_endpoint_labels_of_another_source_warn_and_stay_idempotent(agent, run):
    forged = {**EP, "labels": {"app": "reports", "container:role": "gateway"}}
    r = run("stockade_endpoint", s(agent, **forged), diff=True)
    assert r["changed"] and "container:role" not in r["diff"]["after"]
    warnings = [w["event"]["msg"] if isinstance(w, dict) else w for w in r["warnings"]]
    assert any("labels.container:role" in w and "drops" in w for w in warnings), warnings
    assert [d["label"] for d in r["endpoint"]["dropped_labels"]] == ["container:role=gateway"]
    assert not run("stockade_endpoint", s(agent, **forged))["changed"]


@pytest.mark.parametrize("args,msg", [
    ({"name": "vm1", "ips": ["10.90.0.2"]},
     "state is present but any of the following are missing: interface, mac"),
    ({"name": "vm1", "mac": "06:00:ac:10:00:02"}, "missing: ips"),
    ({**VM_MAC, "mac": "06:00:ac:10:00"}, "mac: '06:00:ac:10:00' is not a MAC address"),
    ({**EP, "ips": ["10.90.0.0/24"]}, "ips: '10.90.0.0/24' is not an IP address"),
    ({**EP, "interface": "much-too-long-name0"}, "interface: 'much-too-long-name0' is not a host interface name"),
], ids=["no-interface-or-mac", "no-ips", "bad-mac", "prefix-not-ip", "long-ifname"])
def test_endpoint_bad_input(agent, run, args, msg):
    r = run("stockade_endpoint", s(agent, **args))
    assert r["failed"] and msg in r["msg"], r["msg"]


# ---------------------------------------------------------------- stockade_ipcache

PEERS = {"host2": [{"name": "db", "ips": ["10.77.2.10"], "labels": {"static:app": "db"}},
                   {"name": "nolabels", "ips": ["10.77.2.11"], "labels": {}}]}


def test_ipcache_converges_and_purges(agent, run):
    agent.add_ipcache({"prefix": "10.9.9.9", "labels": {"app": "stale"}, "host": "gone"})
    r = run("stockade_ipcache", s(agent, endpoints_by_host=PEERS), check=True, diff=True)
    assert r["changed"] and r["added"] == ["10.77.2.10/32"] and r["removed"] == ["10.9.9.9/32"]
    assert "10.9.9.9/32" in r["diff"]["before"] and "static:app=db" in r["diff"]["after"]
    assert {e["prefix"] for e in agent.list_ipcache()} == {"10.9.9.9/32"}
    assert run("stockade_ipcache", s(agent, endpoints_by_host=PEERS))["changed"]
    assert {e["prefix"] for e in agent.list_ipcache()} == {"10.77.2.10/32"}
    assert not run("stockade_ipcache", s(agent, endpoints_by_host=PEERS))["changed"]
    r = run("stockade_ipcache", s(agent, entries=[]))
    assert r["changed"] and r["removed"] == ["10.77.2.10/32"] and agent.list_ipcache() == []


def test_ipcache_no_purge_keeps_others(agent, run):
    agent.add_ipcache({"prefix": "10.9.9.9", "labels": {"app": "keep"}})
    run("stockade_ipcache", s(agent, entries=[{"prefix": "10.1.0.0/16", "labels": {"app": "b"}}],
                              purge=False))
    assert {e["prefix"] for e in agent.list_ipcache()} == {"10.9.9.9/32", "10.1.0.0/16"}


@pytest.mark.parametrize("args,msg", [
    ({"entries": [{"prefix": "10.1.0.1/16", "labels": {"a": "b"}}]},
     "entries[0].prefix: '10.1.0.1/16' is not an IP address or prefix"),
    ({"entries": [{"prefix": "10.1.0.1"}]}, "entries[0].labels: give the remote workload's labels"),
    ({"endpoints_by_host": {"a": [{"ips": ["10.1.1.1"], "labels": {"x": "1"}}],
                            "b": [{"ips": ["10.1.1.1"], "labels": {"x": "2"}}]}},
     "10.1.1.1/32 is claimed by hosts a and b"),
], ids=["host-bits", "no-labels", "overlap"])
def test_ipcache_bad_input(agent, run, args, msg):
    r = run("stockade_ipcache", s(agent, **args))
    assert r["failed"] and msg in r["msg"], r["msg"]


# ---------------------------------------------------------------- stockade_info

def test_info_is_read_only(agent, run):
    agent.add_endpoint({"name": "w", "interface": "veth1", "ips": ["10.0.0.1"],
                        "labels": {"app": "web"}})
    r = run("stockade_info", s(agent), check=True)
    assert not r["changed"]
    assert r["health"]["status"] == "ok" and r["policy_revision"] == agent.revision
    assert [e["name"] for e in r["endpoints"]] == ["w"]
    assert r["counters"]["dropped"] == 0
    r = run("stockade_info", s(agent, gather=["endpoints"]))
    assert set(r) >= {"endpoints"} and "health" not in r


# ---------------------------------------------------------------- stockade_services

SERVICES = {"db": {"labels": {"tier": "data"},
                   "members": [{"endpoint": "pg-ns", "hosts": "dbservers"}]},
            "backup": {"labels": {"tier": "storage"}, "cidrs": ["192.0.2.0/24"]}}


def test_services_check_diff_apply_idempotent(agent, run):
    run("stockade_endpoint", s(agent, name="pg-ns", interface="veth-pg", ips=["10.90.0.5"],
                               labels={"app": "pg"}))
    r = run("stockade_services", s(agent, services=SERVICES), check=True, diff=True)
    assert r["changed"] and agent.services == {}
    assert r["relabeled"] == [{"endpoint": "pg-ns", "service": "db",
                               "labels": ["service:service=db", "service:tier=data",
                                          "static:app=pg"]}]
    assert "db: " in r["diff"]["after"] and "backup: " in r["diff"]["after"]
    assert "relabel pg-ns -> db" in r["diff"]["after"] and r["diff"]["before"] == ""
    r = run("stockade_services", s(agent, services=SERVICES), diff=True)
    assert r["changed"] and set(agent.services) == {"db", "backup"}
    # hosts is the role's business; the agent gets the members without it
    assert agent.services["db"]["members"] == [{"endpoint": "pg-ns"}]
    r = run("stockade_services", s(agent, services=SERVICES), diff=True)
    assert not r["changed"] and r["diff"]["before"] == r["diff"]["after"] == ""
    assert r["services"]["db"]["labels"] == {"tier": "data"}


def test_services_change_and_removal_diff(agent, run):
    run("stockade_services", s(agent, services=SERVICES))
    r = run("stockade_services", s(agent, services={"db": SERVICES["db"]}), diff=True)
    assert r["changed"] and set(agent.services) == {"db"}
    assert r["diff"]["before"].startswith("backup: ") and r["diff"]["after"] == ""
    r = run("stockade_services", s(agent, services={}))
    assert r["changed"] and agent.services == {}


def test_services_conflict_is_returned_and_warned(agent, run):
    run("stockade_endpoint", s(agent, name="pg-ns", interface="veth-pg", ips=["10.90.0.5"]))
    both = {"db": SERVICES["db"], "store": {"members": [{"interface": "veth-*"}]}}
    r = run("stockade_services", s(agent, services=both))
    assert r["conflicts"] == [{"endpoint": "pg-ns", "services": ["db", "store"], "chosen": "db"}]
    assert "pg-ns matches services db, store" in json.dumps(r.get("warnings")), r


@pytest.mark.parametrize("services,field", [
    ({"db": {"members": [{"container_name": "a", "image": "b"}]}}, "services.db.members[0]"),
    ({"db": {"labels": {"tier": "data"}}}, "services.db"),
    ({"backup": {"cidrs": ["192.0.2.1/24"]}}, "services.backup.cidrs[0]"),
    ({"Web": {"cidrs": ["192.0.2.0/24"]}}, "services.Web"),
])
def test_services_bad_input_names_the_field(agent, run, services, field):
    r = run("stockade_services", s(agent, services=services))
    assert r["failed"] and r["msg"].startswith(field + ":"), r["msg"]
    assert agent.services == {}


# ---------------------------------------------------------------- docs agree with the spec

def _compare(doc_opts: dict, spec: dict, where: str) -> list[str]:
    problems = []
    for name in sorted(set(doc_opts) | set(spec)):
        d, s = doc_opts.get(name), spec.get(name)
        if d is None or s is None:
            problems.append(f"{where}{name}: only in {'the spec' if d is None else 'DOCUMENTATION'}")
            continue
        for key, default in (("type", "str"), ("elements", None), ("choices", None),
                             ("default", None), ("required", False)):
            dv, sv = d.get(key, default), s.get(key, default)
            if dv != sv:
                problems.append(f"{where}{name}.{key}: DOCUMENTATION {dv!r}, spec {sv!r}")
        if "options" in s or "suboptions" in d:
            problems += _compare(d.get("suboptions") or {}, s.get("options") or {},
                                 f"{where}{name}.")
    return problems


MODULE_NAMES = ["stockade_info", "stockade_endpoint", "stockade_ipcache", "stockade_policy",
                "stockade_services"]


@pytest.mark.parametrize("name", MODULE_NAMES, ids=MODULE_NAMES)
def test_documentation_agrees_with_argument_spec(modules, name):
    """DOCUMENTATION with its doc fragments (stockade.fleet.agent[.VARIANT]) agrees with
    the argument spec."""
    import importlib.util

    import yaml

    # Not `from conftest import ...`: in a whole-suite run that name is tests/conftest.py.
    path = Path(__file__).resolve().parents[2] / "ansible_collections/stockade/fleet/plugins/doc_fragments/agent.py"
    spec = importlib.util.spec_from_file_location("stockade_doc_fragments_agent", path)
    fragments = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fragments)
    mod = modules[name]
    doc = yaml.safe_load(mod.DOCUMENTATION)
    for ref in doc["extends_documentation_fragment"]:
        assert ref.startswith("stockade.fleet.agent"), ref
        variant = ref.removeprefix("stockade.fleet.agent").lstrip(".").upper() or "DOCUMENTATION"
        frag = yaml.safe_load(getattr(fragments.ModuleDocFragment, variant))
        doc["options"] = {**frag["options"], **doc["options"]}
        doc["attributes"] = {**frag["attributes"], **doc.get("attributes", {})}
    assert _compare(doc["options"], mod.ARGUMENT_SPEC, "") == []
    assert doc["attributes"]["check_mode"]["support"] == "full"
    yaml.safe_load(mod.EXAMPLES)
    ret = yaml.safe_load(mod.RETURN)
    assert all("description" in v and "returned" in v for v in ret.values())
