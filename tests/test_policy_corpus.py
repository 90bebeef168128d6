"""The policy corpus: every file in tests/policies/valid loads, every file in
tests/policies/invalid is rejected whole with exactly the errors listed in INVALID."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.errors import PolicyErrors
from stockade.policy.api.loader import load_file, load_text

pytestmark = pytest.mark.pure

CORPUS = Path(__file__).parent / "policies"
VALID = sorted((CORPUS / "valid").glob("*.[yj][as][mo]*"))
INVALID_FILES = sorted((CORPUS / "invalid").glob("*.yaml"))


def _load(name: str):
    return {(p.ref.kind, p.ref.namespace, p.ref.name): p for p in load_file(CORPUS / "valid" / name)}


def _policy(name: str, policy: str):
    by_name = {p.ref.name: p for p in load_file(CORPUS / "valid" / name)}
    return by_name[policy]


# valid corpus -------------------------------------------------------------------------

@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_valid_file_loads(path):
    policies = load_file(path)
    assert policies
    for p in policies:
        assert p.source == str(path)
        assert p.rules
        assert p.has_l7 == (path.name == "l7-http.yaml")


CNP, CCNP = "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"


@pytest.mark.parametrize("name, refs", [
    ("multidoc.yaml", [(CNP, "a", "web"), (CNP, "b", "web"), (CCNP, "", "web")]),
    ("kind-list.yaml", [(CNP, "", "first"), (CCNP, "", "second")]),
    ("yaml-list.yaml", [(CNP, "", "in-a-list"), (CNP, "", "in-a-list-too")]),
    ("list.json", [(CNP, "ns1", "json-one"), (CCNP, "", "json-two")]),
    ("single.json", [(CNP, "", "json-single")]),
    ("specs.yaml", [(CNP, "dev", "specs")]),
], ids=["multi-document", "kind-list", "yaml-top-level-list", "json-list", "json-object", "specs"])
def test_documents_in_file(name, refs):
    assert [tuple(p.ref) for p in load_file(CORPUS / "valid" / name)] == refs


def _sel(policy, direction="ingress", spec=0):
    rule = policy.rules[spec]
    return [str(e) for pr in getattr(rule, direction) for e in pr.endpoints]


# (file, policy name, what to look at, expected)
SANITIZED = [
    ("selectors.yaml", "selectors", lambda p: str(p.rules[0].endpoint_selector),
     "{!app.example.com/legacy, enabled=true, env in (prod,staging), namespace=prod, release=, "
     "tier=frontend, container:app=web, container:zone notin (a,b), libvirt:vm}"),
    ("selectors.yaml", "selectors", lambda p: _sel(p, "ingress"),
     ["{namespace=prod}", "{app=db, namespace=prod}", "{app=db, namespace=other}",
      "{reserved:host}", "{namespace=prod, static:role=backup}"]),
    ("selectors.yaml", "selectors", lambda p: _sel(p, "egress"),
     ["{namespace=prod, podman:app=cache}", "{namespace=shared}"]),
    ("selectors.yaml", "selectors", lambda p: p.rules[0].description, "selectors with every operator"),
    ("multidoc.yaml", "web", lambda p: (p.ref.kind, str(p.rules[0].endpoint_selector), _sel(p)),
     (CCNP, "{app=web}", ["{app=lb}"])),
    ("entities.yaml", "entities", lambda p: str(p.rules[0].endpoint_selector), "{}"),
    ("entities.yaml", "entities", lambda p: [pr.entities for pr in p.rules[0].ingress + p.rules[0].egress],
     [("host", "remote-node", "world"), ("all", "cluster", "health", "init", "unmanaged"),
      ("all", "cluster", "health", "host", "init", "remote-node", "unmanaged", "world")]),
    ("specs.yaml", "specs", lambda p: [(r.path, str(r.endpoint_selector), _sel(p, "ingress", i) + _sel(p, "egress", i))
                                       for i, r in enumerate(p.rules)],
     [("specs[0]", "{app=a, namespace=dev}", ["{app=b, namespace=dev}"]),
      ("specs[1]", "{app=b, namespace=dev}", ["{app=a, namespace=dev}"]),
      ("specs[2]", "{app=c, namespace=dev}", [])]),
    ("list.json", "json-one", lambda p: (str(p.rules[0].endpoint_selector), _sel(p),
                                         [str(pp) for pp in p.rules[0].ingress[0].to_ports[0].ports]),
     ("{app=api, namespace=ns1}", ["{app=web, namespace=ns1}"], ["8080/TCP"])),
    ("ports.yaml", "ports", lambda p: [(pp.port, pp.end_port, pp.protocol)
                                       for pp in p.rules[0].ingress[0].to_ports[0].ports],
     [(80, None, "TCP"), (443, None, "TCP"), (53, None, "UDP"), (53, None, "UDP"),
      (9, None, "SCTP"), (10, None, "SCTP"), (8000, 8080, "TCP"), (9000, None, "TCP"),
      (7000, None, "ANY"), (7001, None, "ANY"), (7002, None, "ANY"), (0, None, "TCP"),
      (0, None, "UDP"), (65535, None, "TCP")]),
    ("ports.yaml", "ports", lambda p: [str(pp) for pr in p.rules[0].egress[0].to_ports for pp in pr.ports],
     ["5432/TCP", "1-65535/UDP"]),
    ("ports.yaml", "ports", lambda p: [pp.range for pp in p.rules[0].ingress[0].to_ports[0].ports[6:8]],
     [(8000, 8080), (9000, 9000)]),
    ("icmp.yaml", "icmp", lambda p: [str(f) for f in p.rules[0].ingress[0].icmps],
     ["8/icmp", "0/icmp", "8/icmp", "3/icmp", "255/icmp",
      "128/icmpv6", "128/icmpv6", "2/icmpv6", "135/icmpv6"]),
    ("icmp.yaml", "icmp", lambda p: [(f.family, f.type, f.proto) for f in p.rules[0].egress[0].icmps],
     [("IPv6", 129, 58), ("IPv4", 11, 1)]),
    ("single.json", "json-single", lambda p: (str(p.rules[0].endpoint_selector), p.rules[0].egress[0].icmps[0].type),
     ("{app}", 8)),
    ("cidr.yaml", "cidrs", lambda p: [str(c) for pr in p.rules[0].ingress for c in pr.cidrs],
     ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32", "2001:db8::1/128",
      "172.16.0.0/12 except 172.16.1.0/24, 172.16.1.128/25, 172.16.9.0/24",
      "2001:db8:1::/48 except 2001:db8:1:2::/64, 2001:db8:1:ff::/64"]),
    ("cidr.yaml", "cidrs", lambda p: [str(c) for pr in p.rules[0].egress for c in pr.cidrs],
     ["0.0.0.0/0", "::/0", "198.51.100.0/24", "203.0.113.0/24 except 203.0.113.5/32"]),
    ("deny.yaml", "deny", lambda p: (p.rules[0].ingress, p.rules[0].egress,
                                     [pr.path for pr in p.rules[0].ingress_deny + p.rules[0].egress_deny]),
     ((), (), ["spec.ingressDeny[0]", "spec.ingressDeny[1]", "spec.egressDeny[0]", "spec.egressDeny[1]"])),
    ("deny.yaml", "deny", lambda p: (p.rules[0].default_deny_ingress, p.rules[0].default_deny_egress,
                                     p.rules[0].wants_default_deny("ingress"), p.rules[0].wants_default_deny("egress")),
     (False, True, False, True)),
    ("deny.yaml", "deny", lambda p: (p.rules[0].labels, p.rules[0].description),
     (("static:owner=netops", "unspec:bare="), "deny rules and default deny off")),
    ("deny.yaml", "deny", lambda p: (_sel(p, "ingress_deny"), [str(c) for c in p.rules[0].egress_deny[1].cidrs]),
     (["{app=bad, namespace=prod}"], ["10.0.0.0/8 except 10.1.0.0/16"])),
    ("cidr.yaml", "cidrs", lambda p: (p.rules[0].default_deny_ingress, p.rules[0].wants_default_deny("ingress")),
     (None, True)),
]
SANITIZED_IDS = [
    "namespace-added-to-endpointSelector-operators-normalized",
    "namespace-added-to-peers-except-namespace-key-and-reserved",
    "namespace-key-with-any-source-not-overridden",
    "description",
    "ccnp-gains-no-namespace",
    "empty-selector-without-namespace-stays-empty",
    "entities-deduplicated-and-sorted",
    "specs-each-get-namespace",
    "json-namespace-and-lowercase-protocol",
    "port-string-to-int-protocol-upper-endport-collapse",
    "port-ranges-render",
    "endport-range-and-collapsed",
    "icmp-names-to-numbers",
    "icmp-family-and-proto",
    "json-exists-and-default-family",
    "cidr-bare-address-ipv6-except-sorted",
    "cidr-egress-ipv6-default-routes",
    "deny-directions",
    "enable-default-deny",
    "rule-labels",
    "deny-peer-namespace-and-except",
    "default-deny-unset",
]


@pytest.mark.parametrize("name, policy, get, expected", SANITIZED, ids=SANITIZED_IDS)
def test_sanitized(name, policy, get, expected):
    assert get(_policy(name, policy)) == expected


# invalid corpus -----------------------------------------------------------------------

NS = "(named ports are not supported)"
ENTITIES = "(one of host, world, unmanaged, health, init, remote-node, cluster, all)"
UNSUPPORTED = {
    "toFQDNs": "spec.egress[0].toFQDNs", "toServices": "spec.egress[0].toServices",
    "toRequires": "spec.egress[0].toRequires", "toNodes": "spec.egress[0].toNodes",
    "toGroups": "spec.egress[0].toGroups", "authentication": "spec.egress[0].authentication",
    "fromRequires": "spec.ingress[0].fromRequires", "fromNodes": "spec.ingress[0].fromNodes",
    "fromGroups": "spec.ingress[0].fromGroups", "nodeSelector": "spec.nodeSelector",
    "serverNames": "spec.egress[0].toPorts[0].serverNames",
    "listener": "spec.egress[0].toPorts[0].listener",
    "originatingTLS": "spec.egress[0].toPorts[0].originatingTLS",
    "terminatingTLS": "spec.egress[0].toPorts[0].terminatingTLS",
    "rules-dns": "spec.egress[0].toPorts[0].rules.dns",
    "rules-kafka": "spec.egress[0].toPorts[0].rules.kafka",
    "rules-l7proto": "spec.egress[0].toPorts[0].rules.l7proto",
    "headerMatches": "spec.ingress[0].toPorts[0].rules.http[0].headerMatches",
    "cidrGroupSelector": "spec.ingress[0].fromCIDRSet[0].cidrGroupSelector",
}

# file -> every error it must produce: (document index, path, message substring)
INVALID = {
    "unknown-field-top.yaml": [(0, "sepc", "unknown field")],
    "unknown-field-metadata-and-spec.yaml": [
        (0, "spec.ingresss", "unknown field"),
        (0, "spec.endpointSelector.matchLabel", "unknown field")],
    "unknown-field-deep.yaml": [
        (0, "spec.egress[0].icmps[0].fields[0].code", "unknown field"),
        (0, "spec.egress[0].toCIDRSet[0].exceptions", "unknown field"),
        (0, "spec.ingress[0].fromEndpoints[0].selector", "unknown field"),
        (0, "spec.ingress[0].toPorts[0].ports[0].prot", "unknown field")],
    **{f"unsupported-{k}.yaml": [(0, v, f"{v.rsplit('.', 1)[-1]} is not supported by Stockade")]
       for k, v in UNSUPPORTED.items()},
    "cidrGroupRef.yaml": [(0, "spec.egress[0].toCIDRSet[0]",
                           "cidrGroupRef cannot be combined with cidr or except")],
    "port-named.yaml": [(0, "spec.ingress[0].toPorts[0].ports[0].port", f"'http2' is not a port number {NS}")],
    "port-too-big.yaml": [(0, "spec.ingress[0].toPorts[0].ports[0].port", "70000 is not a port number (0-65535)")],
    "port-negative.yaml": [(0, "spec.egress[0].toPorts[0].ports[0].port", "-1 is not a port number (0-65535)")],
    "port-float.yaml": [(0, "spec.ingress[0].toPorts[0].ports[0].port",
                         "must be of type string or integer, not float")],
    "endport-below-port.yaml": [(0, "spec.ingress[0].toPorts[0].ports[0].endPort", "endPort 8000 is below port 9000")],
    "endport-without-port.yaml": [(0, "spec.ingress[0].toPorts[0].ports[0].endPort", "endPort needs a non-zero port")],
    "endport-too-big.yaml": [(0, "spec.ingress[0].toPorts[0].ports[0].endPort", "65536 is not a port number (1-65535)")],
    "protocol-bad.yaml": [(0, "spec.ingress[0].toPorts[0].ports[0].protocol", "'ICMP' is not one of TCP, UDP, SCTP, ANY")],
    "toports-without-ports.yaml": [(0, "spec.ingress[0].toPorts[0].ports", "at least one port is required")],
    "cidr-bad.yaml": [
        (0, "spec.ingress[0].fromCIDR[0]", "'10.0.0.0/33' is not a valid CIDR"),
        (0, "spec.ingress[0].fromCIDR[1]", "'not-an-address' is not a valid CIDR"),
        (0, "spec.egress[0].toCIDRSet[0].cidr", "'300.0.0.0/8' is not a valid CIDR")],
    "cidr-host-bits.yaml": [
        (0, "spec.egress[0].toCIDR[0]", "10.0.0.1/8 has host bits set"),
        (0, "spec.egress[1].toCIDRSet[0].cidr", "2001:db8::1/32 has host bits set")],
    "except-outside.yaml": [(0, "spec.ingress[0].fromCIDRSet[0].except[1]", "192.168.0.0/16 is not inside 10.0.0.0/8")],
    "except-other-family.yaml": [
        (0, "spec.egress[0].toCIDRSet[0].except[0]", "2001:db8::/32 is not inside 10.0.0.0/8"),
        (0, "spec.egress[0].toCIDRSet[1].except[0]", "10.0.0.0/16 is not inside 2001:db8::/32")],
    "except-bad.yaml": [(0, "spec.egress[0].toCIDRSet[0].except[0]", "10.1.0.1/16 has host bits set")],
    "cidrset-without-cidr.yaml": [(0, "spec.egress[0].toCIDRSet[0].cidr", "is required")],
    "label-key-bad.yaml": [
        (0, "spec.endpointSelector.matchLabels.-app", "'-app' is not a valid label key"),
        (0, "spec.endpointSelector.matchLabels.bogus:app", "unknown label source 'bogus'"),
        (0, "spec.ingress[0].fromEndpoints[0].matchExpressions[0].key", "'app name' is not a valid label key")],
    "label-value-bad.yaml": [
        (0, "spec.endpointSelector.matchLabels.app", "'web server' is not a valid label value"),
        (0, "spec.egress[0].toEndpoints[0].matchExpressions[0].values[1]", "'-bad-' is not a valid label value")],
    "operator-bad.yaml": [(0, "spec.endpointSelector.matchExpressions[0].operator",
                           "'Equals' is not one of In, NotIn, Exists, DoesNotExist")],
    "operator-in-without-values.yaml": [
        (0, "spec.endpointSelector.matchExpressions[0].values", "operator In needs at least one value"),
        (0, "spec.endpointSelector.matchExpressions[1].values", "operator NotIn needs at least one value")],
    "operator-exists-with-values.yaml": [
        (0, "spec.endpointSelector.matchExpressions[0].values", "operator Exists takes no values"),
        (0, "spec.endpointSelector.matchExpressions[1].values", "operator DoesNotExist takes no values")],
    "entity-bad.yaml": [
        (0, "spec.ingress[0].fromEntities[1]", f"entity 'kube-apiserver' is not supported {ENTITIES}"),
        (0, "spec.egress[0].toEntities[0]", "entity 'Host' is not supported")],
    "icmp-bad-name.yaml": [
        (0, "spec.ingress[0].icmps[0].fields[0].type", "'Ping' is not a known IPv4 ICMP type name"),
        (0, "spec.ingress[0].icmps[0].fields[1].type", "'PacketTooBig' is not a known IPv4 ICMP type name"),
        (0, "spec.ingress[0].icmps[0].fields[2].type", "'Redirect' is not a known IPv6 ICMP type name")],
    "icmp-bad-family.yaml": [
        (0, "spec.egress[0].icmps[0].fields[0].family", "'IPv5' is not IPv4 or IPv6"),
        (0, "spec.egress[0].icmps[0].fields[1].family", "'ipv4' is not IPv4 or IPv6")],
    "icmp-out-of-range.yaml": [
        (0, "spec.egress[0].icmps[0].fields[0].type", "256 is not an ICMP type (0-255)"),
        (0, "spec.egress[0].icmps[0].fields[1].type", "300 is not an ICMP type (0-255)")],
    "missing-name.yaml": [(0, "metadata.name", "is required")],
    "missing-metadata.yaml": [(0, "metadata", "is required")],
    "bad-name.yaml": [
        (0, "metadata.name", "'Web_Policy' must be lower-case letters, digits, '-' and '.'"),
        (0, "metadata.namespace", "'Prod' must be lower-case")],
    "missing-endpointSelector.yaml": [(0, "spec.endpointSelector", "is required")],
    "missing-spec.yaml": [(0, "spec", "is required (or specs)")],
    "specs-empty.yaml": [(0, "specs", "should be non-empty")],
    "wrong-apiVersion.yaml": [(0, "apiVersion", "'cilium.io/v2' was expected")],
    "wrong-kind.yaml": [(0, "kind", "'NetworkPolicy' is not one of")],
    "ccnp-namespace.yaml": [(0, "metadata.namespace", "CiliumClusterwideNetworkPolicy is not namespaced")],
    "duplicate-name.yaml": [(1, "metadata.name", "policy prod/web (CiliumNetworkPolicy) is defined twice (first in document 0)")],
    "yaml-syntax.yaml": [(0, "spec.endpointSelector",
                          "cannot parse at line 7, column 3: did not find expected ',' or '}'")],
    "one-of-three-bad.yaml": [(1, "spec.ingress[0].toPorts[0].ports[0].port", f"'http2' is not a port number {NS}")],
    "l7-http-bad-regex.yaml": [(0, "spec.ingress[0].toPorts[0].rules.http[0].path",
                                "invalid regular expression (RE2 syntax): missing )")],
    "l7-http-in-deny.yaml": [(0, "spec.ingressDeny[0].toPorts[0].rules", "deny rules cannot have L7 rules")],
    "not-a-mapping.yaml": [(0, "", "must be of type object, not str")],
    # Shapes Cilium's rule validation refuses, with its wording.
    "combine-endpoints-cidr.yaml": [
        (0, "spec.ingress[0]", "Combining FromEndpoints and FromCIDR is not supported yet"),
        (0, "spec.ingressDeny[0]", "Combining FromEndpoints and FromEntities is not supported yet"),
        (0, "spec.egress[0]", "Combining ToEndpoints and ToEntities is not supported yet")],
    "combine-tocidr-tocidrset.yaml": [
        (0, "spec.egress[0]", "Combining ToCIDR and ToCIDRSet is not supported yet"),
        (0, "spec.ingress[0]", "Combining FromCIDR and FromCIDRSet is not supported yet")],
    "icmps-with-toports.yaml": [
        (0, "spec.egress[0]", "The ICMPs block may only be present without ToPorts. "
                              "Define a separate rule to use ToPorts."),
        (0, "spec.ingressDeny[0]", "The ICMPs block may only be present without ToPorts.")],
    "endpointselector-other-namespace.yaml": [
        (0, "spec.endpointSelector", "a policy in namespace ns1 selects only workloads of that "
                                     "namespace; io.kubernetes.pod.namespace=ns2 names another"),
        (1, "spec.endpointSelector", "namespace notin (ns1) names another")],
}


def test_invalid_table_matches_corpus():
    assert sorted(INVALID) == [p.name for p in INVALID_FILES]


@pytest.mark.parametrize("name, expected", sorted(INVALID.items()), ids=sorted(INVALID))
def test_invalid_file_rejected(name, expected):
    path = CORPUS / "invalid" / name
    with pytest.raises(PolicyErrors) as info:
        load_file(path)
    errors = info.value.errors
    assert len(errors) == len(expected), [str(e) for e in errors]
    for err, (index, field, msg) in zip(sorted(errors, key=lambda e: e.path), sorted(expected, key=lambda e: e[1]), strict=False):
        assert err.file == str(path)
        assert err.doc_index == index
        assert err.path == field
        assert msg in err.msg
        assert str(err).startswith(f"{path}: ")
        assert str(err).endswith(f"{field}: {err.msg}" if field else f": {err.msg}")


@pytest.mark.parametrize("name, rendered", [
    ("port-named.yaml",
     "{f}: document 0 (p): spec.ingress[0].toPorts[0].ports[0].port: "
     "'http2' is not a port number (named ports are not supported)"),
    ("one-of-three-bad.yaml",
     "{f}: document 1 (middle): spec.ingress[0].toPorts[0].ports[0].port: "
     "'http2' is not a port number (named ports are not supported)"),
    ("ccnp-namespace.yaml",
     "{f}: document 0 (p): metadata.namespace: CiliumClusterwideNetworkPolicy is not namespaced"),
    ("unsupported-toFQDNs.yaml",
     "{f}: document 0 (p): spec.egress[0].toFQDNs: toFQDNs is not supported by Stockade"),
    ("missing-name.yaml", "{f}: document 0: metadata.name: is required"),
    ("l7-http-in-deny.yaml",
     "{f}: document 0 (p): spec.ingressDeny[0].toPorts[0].rules: deny rules cannot have L7 rules"),
    ("yaml-syntax.yaml",
     "{f}: document 0 (p): spec.endpointSelector: "
     "cannot parse at line 7, column 3: did not find expected ',' or '}}'"),
], ids=["port", "second-of-three", "ccnp-namespace", "unsupported", "no-name", "l7", "yaml-syntax"])
def test_error_rendering(name, rendered):
    path = CORPUS / "invalid" / name
    with pytest.raises(PolicyErrors) as info:
        load_file(path)
    assert str(info.value) == rendered.format(f=path)
    assert info.value.to_dict()["errors"][0]["message"] == rendered.format(f=path)


def test_one_bad_document_rejects_whole_file():
    """The first and last documents are fine; nothing from the file is returned."""
    path = CORPUS / "invalid" / "one-of-three-bad.yaml"
    with pytest.raises(PolicyErrors) as info:
        load_file(path)
    assert [(e.doc_index, e.doc_name) for e in info.value.errors] == [(1, "middle")]


@pytest.mark.parametrize("doc, errors", [
    ("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: 80, protocol: TCP}]
      rules: {http: [{method: GET, path: "/api/.*"}]}
""", []),
    ("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: 80, protocol: TCP}]
      rules: {http: [{method: "[", headers: ["bad header"]}]}
""", [("spec.ingress[0].toPorts[0].rules.http[0].headers[0]", "'bad header' is not a valid header"),
      ("spec.ingress[0].toPorts[0].rules.http[0].method", "invalid regular expression")]),
], ids=["http-allowed", "http-errors-reported"])
def test_l7_allowed(doc, errors):
    if not errors:
        [policy] = load_text(doc, "inline.yaml")
        assert policy.has_l7
        assert policy.rules[0].ingress[0].to_ports[0].http[0].path == "/api/.*"
        return
    with pytest.raises(PolicyErrors) as info:
        load_text(doc, "inline.yaml")
    got = sorted((e.path, e.msg) for e in info.value.errors)
    assert len(got) == len(errors)
    for (path, msg), (epath, emsg) in zip(got, errors, strict=False):
        assert path == epath and emsg in msg


@pytest.mark.parametrize("text", ["²", "٨٠"], ids=["superscript", "arabic-indic"])
def test_non_ascii_digits_are_not_ports(text):
    from stockade.errors import PolicyErrors
    from stockade.policy.api.loader import load_text
    doc = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
           f"spec:\n  endpointSelector: {{}}\n  ingress:\n  - toPorts: [{{ports: [{{port: \"{text}\"}}]}}]\n")
    with pytest.raises(PolicyErrors, match="is not a port number"):
        load_text(doc, "x.yaml")


def _corpus_docs():
    from stockade.policy.api.loader import parse_documents
    for path in sorted((Path(__file__).parent / "policies").rglob("*.*")):
        try:
            docs = parse_documents(path.read_text(), path.name)
        except Exception:
            continue
        for i, d in enumerate(docs):
            yield pytest.param(d, id=f"{path.parent.name}/{path.name}#{i}")


@pytest.mark.parametrize("doc", list(_corpus_docs()))
def test_fast_schema_walk_agrees_with_jsonschema(doc):
    from stockade.policy.api.validation import _SCHEMA, _VALIDATOR, _fast_valid
    assert _fast_valid(doc, _SCHEMA) in (_VALIDATOR.is_valid(doc), None)


_json = st.recursive(
    st.one_of(
        *(st.just(v) for v in (None, True, 0, 80, "80", "TCP", "", "x"))),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                ["port", "protocol", "ports", "toPorts", "fromEndpoints", "matchLabels", "app",
                 "ingress", "egress", "toFQDNs", "cidr", "except", "endpointSelector", "icmps"]),
            inner, max_size=3)), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(spec=_json)
def test_fast_schema_walk_agrees_on_random_specs(spec):
    from stockade.policy.api.validation import _SCHEMA, _VALIDATOR, _fast_valid
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p"},
           "spec": spec}
    assert _fast_valid(doc, _SCHEMA) in (_VALIDATOR.is_valid(doc), None)
