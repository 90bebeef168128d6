"""The Stockade modules against a fake agent on a real unix socket: check mode changes
nothing, diff shows what changes, a second run is not changed, bad input says what to fix."""
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
    ({"documents": [WEB], "state": "absent", "replace_all": True}, "replace_all goes with"),
    ({"src": ["/nonexistent/p.yaml"]}, "src: cannot read /nonexistent/p.yaml"),
    ({"content": [{"name": "bad.yaml", "text": BAD_TEXT}]},
     "bad.yaml: spec.ingress[0].toPorts[0].ports[0].port"),
    ({"state": "sideways", "documents": [WEB]}, "state"),
], ids=["nothing", "absent-replace", "missing-src", "invalid-policy", "bad-state"])
def test_policy_bad_input(agent, run, args, msg):
    r = run("stockade_policy", s(agent, **args))
    assert r["failed"] and msg in r["msg"], r["msg"]
    assert agent.policies == {}


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


@pytest.mark.parametrize("args,msg", [
    ({"name": "vm1"}, "state is present but all of the following are missing: interface, ips"),
    ({**EP, "ips": ["10.90.0.0/24"]}, "ips: '10.90.0.0/24' is not an IP address"),
    ({**EP, "interface": "much-too-long-name0"}, "interface: 'much-too-long-name0' is not a host interface name"),
], ids=["missing", "prefix-not-ip", "long-ifname"])
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


MODULE_NAMES = ["stockade_info", "stockade_endpoint", "stockade_ipcache", "stockade_policy"]


@pytest.mark.parametrize("name", MODULE_NAMES, ids=MODULE_NAMES)
def test_documentation_agrees_with_argument_spec(modules, name):
    import yaml
    mod = modules[name]
    doc = yaml.safe_load(mod.DOCUMENTATION)
    assert _compare(doc["options"], mod.ARGUMENT_SPEC, "") == []
    assert doc["attributes"]["check_mode"]["support"] == "full"
    yaml.safe_load(mod.EXAMPLES)
    ret = yaml.safe_load(mod.RETURN)
    assert all("description" in v and "returned" in v for v in ret.values())
