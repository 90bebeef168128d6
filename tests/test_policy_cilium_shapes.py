"""Issue 12: where Stockade's policy semantics differed from Cilium's, each case as a
trace over the corpus files (tests/policies/valid) or a sanitized document."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stockade.cli.main import cli
from stockade.errors import PolicyErrors
from stockade.policy.api.loader import load_file, load_text
from stockade.policy.api.selector import EndpointSelector
from stockade.policy.api.validation import sanitize_document
from stockade.policy.labels import LabelSet
from stockade.policy.sel import parse_port, parse_sel
from stockade.policy.trace import Tracer

pytestmark = pytest.mark.pure

VALID = Path(__file__).parent / "policies" / "valid"


def verdict(files, src, dst, port):
    policies = [p for f in files for p in load_file(VALID / f)]
    return Tracer(policies).trace(parse_sel(src), parse_sel(dst), *parse_port(port))["verdict"]


# 1. explicitly empty peer lists select nothing --------------------------------------
@pytest.mark.parametrize("src, dst, port", [
    ("app=rogue", "app=db", "5432/tcp"),            # fromEndpoints: []
    ("entity:world", "app=db", "5433/tcp"),         # fromEntities: []
    ("entity:host", "app=db", "5433/tcp"),
    ("cidr:192.0.2.1/32", "app=db", "5434/tcp"),    # fromCIDR: []
    ("cidr:192.0.2.1/32", "app=db", "5435/tcp"),    # fromCIDRSet: []
    ("app=web", "app=db", "5432/tcp"),              # toEndpoints: [] (web's egress)
    ("app=web", "cidr:198.51.100.7/32", "443/tcp"),  # toCIDR: []
    ("app=web", "entity:world", "53/udp"),           # toEntities: []
    ("app=web", "cidr:198.51.100.7/32", "8443/tcp"),  # toCIDRSet: []
], ids=["fromEndpoints", "fromEntities-world", "fromEntities-host", "fromCIDR", "fromCIDRSet",
        "toEndpoints", "toCIDR", "toEntities", "toCIDRSet"])
def test_empty_peer_list_selects_no_peer(src, dst, port):
    assert verdict(["empty-peer-lists.yaml"], src, dst, port) == "deny"


def test_absent_peer_list_is_every_peer_but_empty_is_none():
    """Nil and [] are told apart from the parser to the compiler."""
    def doc(extra):
        return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p"},
                "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
                         "ingress": [{**extra, "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]}}
    absent, empty = sanitize_document(doc({})), sanitize_document(doc({"fromEndpoints": []}))
    assert absent.rules[0].ingress[0].empty_fields == ()
    assert empty.rules[0].ingress[0].empty_fields == ("fromEndpoints",)
    assert empty.rules[0].ingress[0].selects_nothing and not absent.rules[0].ingress[0].selects_nothing
    for policy, expected in ((absent, "allow"), (empty, "deny")):
        t = Tracer([policy]).trace(parse_sel("app=rogue"), parse_sel("app=db"), *parse_port("5432/tcp"))
        assert t["verdict"] == expected
        assert t["ingress"]["enforced"] is True  # the element still makes ingress default-deny


def test_empty_peer_list_is_described_as_no_peer():
    from stockade.policy.describe import describe_rule
    [p] = [p for p in load_file(VALID / "empty-peer-lists.yaml") if p.ref.name == "empty-from-endpoints"]
    [line] = describe_rule(p.rules[0])
    assert "any peer" not in line
    assert line == ("empty-from-endpoints: ingress default-deny for {app=db} "
                    "(no peer (fromEndpoints: [] selects none))")


# 2. a top-level description ---------------------------------------------------------
def test_top_level_description_is_kept():
    [p] = load_file(VALID / "description.yaml")
    assert p.description == "L3-L4 policy to restrict deathstar access to empire ships only"
    assert verdict(["description.yaml"], "org=empire", "org=empire,class=deathstar", "80/tcp") == "allow"
    assert verdict(["description.yaml"], "org=alliance", "org=empire,class=deathstar", "80/tcp") == "deny"


def test_description_must_be_a_string():
    with pytest.raises(PolicyErrors, match="description: must be of type string"):
        load_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\ndescription: [x]\n"
                  "metadata: {name: p}\nspec: {endpointSelector: {}}\n", "d.yaml")


# 3. namespaces, as Cilium -------------------------------------------------------------
@pytest.mark.parametrize("src, dst, expected", [
    ("namespace=ns2,name=luke", "namespace=ns1,name=leia", "allow"),
    ("container:io.kubernetes.pod.namespace=ns2,name=luke", "static:namespace=ns1,name=leia", "allow"),
    ("k8s:io.kubernetes.pod.namespace=ns2,name=luke", "io.kubernetes.pod.namespace=ns1,name=leia", "allow"),
    ("namespace=ns1,name=luke", "namespace=ns1,name=leia", "deny"),
    ("namespace=ns3,name=any", "namespace=ns1,name=leia", "allow"),
    ("libvirt:namespace=ns4", "namespace=ns1,name=leia", "allow"),
    ("namespace=ns5", "namespace=ns1,name=leia", "deny"),
    ("namespace=ns2,name=luke", "namespace=ns2,name=leia", "allow"),  # not selected: no policy
], ids=["cross-namespace", "either-key-any-source", "k8s-prefix", "own-namespace-not-named",
        "io-key-without-source", "namespace-expression", "other-namespace", "ns2-leia-unselected"])
def test_namespace_keys_and_cross_namespace_peers(src, dst, expected):
    assert verdict(["cross-namespace.yaml"], src, dst, "80/tcp") == expected


def test_namespace_keys_match_each_other_whatever_the_source():
    sel = EndpointSelector.build({"k8s:io.kubernetes.pod.namespace": "ns2"}, [])
    for labels in ("container:namespace=ns2", "static:io.kubernetes.pod.namespace=ns2",
                   "namespace=ns2"):
        assert sel.matches(LabelSet.parse(labels)), labels
    assert not sel.matches(LabelSet.parse("container:namespace=ns1"))
    spelled = EndpointSelector.build({}, [("io.kubernetes.pod.namespace", "In", ["ns2"])])
    assert spelled.matches(LabelSet.parse("podman:namespace=ns2"))


def test_namespaced_endpoint_selector_always_gets_its_namespace():
    [_, _, own] = load_file(VALID / "cross-namespace.yaml")
    assert "namespace=ns1" in str(own.rules[0].endpoint_selector)
    assert verdict(["cross-namespace.yaml"], "namespace=ns1,name=han", "namespace=ns1,app=x", "80/tcp") == "allow"
    assert verdict(["cross-namespace.yaml"], "namespace=ns1,name=han", "namespace=ns2,app=x", "80/tcp") == "deny"
    # han of ns2 is not selected by ns1's policy, so nothing limits its egress.
    t = Tracer(load_file(VALID / "cross-namespace.yaml")).trace(
        parse_sel("namespace=ns2,name=han"), parse_sel("app=x"), *parse_port("80/tcp"))
    assert t["egress"]["enforced"] is False
    t = Tracer(load_file(VALID / "cross-namespace.yaml")).trace(
        parse_sel("namespace=ns1,name=han"), parse_sel("app=x"), *parse_port("80/tcp"))
    assert t["egress"]["enforced"] is True


# 4. refused shapes, but a stored one still compiles as before --------------------------
def test_stored_policy_in_a_refused_shape_reads_leniently():
    doc = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mixed}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    fromCIDR: [192.0.2.0/24]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
    with pytest.raises(PolicyErrors, match="Combining FromEndpoints and FromCIDR"):
        sanitize_document(doc)
    p = sanitize_document(doc, strict=False)
    assert p.problems == ("spec.ingress[0]: Combining FromEndpoints and FromCIDR is not supported yet",)
    t = Tracer([p])
    assert t.trace(parse_sel("app=web"), parse_sel("app=db"), *parse_port("5432/tcp"))["verdict"] == "allow"
    assert t.trace(parse_sel("cidr:192.0.2.9/32"), parse_sel("app=db"), *parse_port("5432/tcp"))["verdict"] == "allow"
    assert t.trace(parse_sel("app=x"), parse_sel("app=db"), *parse_port("5432/tcp"))["verdict"] == "deny"


def test_lenient_reading_still_refuses_everything_else():
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p"},
           "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "http"}]}]}]}}
    with pytest.raises(PolicyErrors, match="is not a port number"):
        sanitize_document(doc, strict=False)


def test_stored_endpoint_selector_of_another_namespace_keeps_its_old_meaning():
    doc = yaml.safe_load((Path(__file__).parent / "policies" / "invalid" /
                          "endpointselector-other-namespace.yaml").read_text().split("---")[0])
    p = sanitize_document(doc, strict=False)
    assert p.problems and "ns1" not in str(p.rules[0].endpoint_selector)


# 5. traces over prefixes ---------------------------------------------------------------
def prefix_trace(dst):
    """web's egress over a prefix, by valid/cidr-except.yaml: 10.0.0.0/8 except 10.1.0.0/16."""
    return Tracer(load_file(VALID / "cidr-except.yaml")).trace(parse_sel("app=web"), parse_sel(dst),
                                                                *parse_port("443/tcp"))


def test_trace_over_a_prefix_with_a_denied_part_is_partial():
    t = prefix_trace("cidr:10.0.0.0/8")
    assert t["verdict"] == "partial"
    assert [(p["cidr"], p.get("except"), p["verdict"]) for p in t["parts"]] == [
        ("10.0.0.0/8", ["10.1.0.0/16"], "allow"), ("10.1.0.0/16", None, "deny")]


@pytest.mark.parametrize("dst, expected", [("cidr:10.2.0.0/16", "allow"), ("cidr:10.1.2.0/24", "deny"),
                                           ("cidr:10.1.0.0/16", "deny"), ("cidr:0.0.0.0/0", "partial")])
def test_trace_over_prefixes(dst, expected):
    t = prefix_trace(dst)
    assert t["verdict"] == expected
    assert ("parts" in t) == (expected == "partial")


def test_trace_partial_in_words_and_json():
    args = ["policy", "trace", "--src", "app=web", "--dst", "cidr:10.0.0.0/8", "--dport", "443/tcp",
            str(VALID / "cidr-except.yaml")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "cidr:10.0.0.0/8 except 10.1.0.0/16: ALLOW" in r.output
    assert "cidr:10.1.0.0/16: DENY" in r.output
    assert r.output.strip().endswith("Final verdict: PARTIAL (1 of 2 parts allowed, the others denied)")
    data = json.loads(CliRunner().invoke(cli, args + ["-o", "json"]).output)
    assert data["verdict"] == "partial"
    assert [p["verdict"] for p in data["parts"]] == ["allow", "deny"]
