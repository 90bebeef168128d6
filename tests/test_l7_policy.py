"""L7 (HTTP) policy semantics: validation and the compiler's rule sets per (endpoint,
direction, port, peer). Enforcement is in tests/root/test_l7*.py."""
import pytest
import yaml

from stockade.errors import PolicyErrors
from stockade.policy.api.ports import HTTPRule
from stockade.policy.api.validation import sanitize_document
from stockade.policy.compiler import ALL_HTTP, Compiler, full_compile
from stockade.policy.identity import IdentityAllocator, reserved_identities
from stockade.policy.labels import LabelSet
from stockade.policy.mapstate import ANY_PEER, EGRESS, INGRESS, L7Key
from test_compiler import World, policy

WEB = dict(web="app=web", api="app=api", other="app=other")


def errors_of(spec):
    with pytest.raises(PolicyErrors) as info:
        policy(spec)
    return [(e.path, e.msg) for e in info.value.errors]


def l7_spec(http, port=8080, peers="[{matchLabels: {app: web}}]", extra=""):
    peer = f"fromEndpoints: {peers}, " if peers else ""  # none: every peer (ANY_PEER)
    return (f"{{endpointSelector: {{matchLabels: {{app: api}}}}, ingress: [{{{peer}"
            f"toPorts: [{{ports: [{{port: '{port}', protocol: TCP}}], rules: {{http: {http}}}}}]}}"
            f"{extra}]}}")


# validation -------------------------------------------------------------------------

def test_http_rules_accepted():
    p = policy(l7_spec("[{method: GET, path: '/api/.*', host: 'a\\.example', "
                       "headers: ['X-Token: abc', 'X-Trace']}]"))
    assert p.has_l7
    rule = p.rules[0].ingress[0].to_ports[0].http[0]
    assert rule == HTTPRule("GET", "/api/.*", "a\\.example", ("X-Token: abc", "X-Trace"))


def test_header_matches_refused():
    errs = errors_of(l7_spec("[{headerMatches: [{name: X, value: y}]}]"))
    assert errs == [("spec.ingress[0].toPorts[0].rules.http[0].headerMatches",
                     "headerMatches is not supported by Stockade")]


def test_l7_in_deny_refused():
    spec = ("{endpointSelector: {}, ingressDeny: [{toPorts: [{ports: [{port: '80', protocol: TCP}], "
            "rules: {http: [{method: GET}]}}]}]}")
    assert errors_of(spec) == [("spec.ingressDeny[0].toPorts[0].rules", "deny rules cannot have L7 rules")]


def egress_spec(http, port=8080, peers="[{matchLabels: {app: api}}]", extra=""):
    peer = f"toEndpoints: {peers}, " if peers else ""
    return (f"{{endpointSelector: {{matchLabels: {{app: web}}}}, egress: [{{{peer}"
            f"toPorts: [{{ports: [{{port: '{port}', protocol: TCP}}], rules: {{http: {http}}}}}]}}"
            f"{extra}]}}")


def test_egress_http_rules_accepted():
    p = policy(egress_spec("[{method: GET, path: '/a'}]"))
    assert p.has_l7 and p.rules[0].egress[0].to_ports[0].http == (HTTPRule("GET", "/a"),)


def test_l7_in_egress_deny_refused():
    spec = ("{endpointSelector: {}, egressDeny: [{toPorts: [{ports: [{port: '80', protocol: TCP}], "
            "rules: {http: [{method: GET}]}}]}]}")
    assert errors_of(spec) == [("spec.egressDeny[0].toPorts[0].rules", "deny rules cannot have L7 rules")]


def test_egress_rule_sets_per_peer_with_l4_only_peer_unfiltered():
    """The client's egress rules, keyed by the client (local) and the server (peer);
    an L4-only egress rule for the same port passes that peer's requests unfiltered."""
    extra = (", {toEndpoints: [{matchLabels: {app: other}}], "
             "toPorts: [{ports: [{port: '8080', protocol: TCP}]}]}")
    w = World(**WEB).apply(policy(egress_spec("[{method: GET}]", extra=extra)))
    web, api, other = w.ids["web"], w.ids["api"], w.ids["other"]
    assert w.c.l7 == {L7Key(web, EGRESS, 8080, api): frozenset({HTTPRule("GET")}),
                      L7Key(web, EGRESS, 8080, other): frozenset({ALL_HTTP})}
    assert w.c.l7_policies(L7Key(web, EGRESS, 8080, api)) == ("p",)
    assert w.ok("web", "api", port=8080) and not w.ok("web", "api", port=8081)


def test_egress_visibility_only():
    w = World(**WEB).apply(policy(egress_spec("[{}]", peers=None)))
    assert w.c.l7 == {L7Key(w.ids["web"], EGRESS, 8080, ANY_PEER): frozenset({ALL_HTTP})}


@pytest.mark.parametrize("pattern, why", [
    ("(a)\\\\1", "invalid escape sequence"),       # backreference
    ("/(?=admin)", "invalid perl operator"),       # lookahead
    ("/(?<!x)y", "invalid perl operator"),         # lookbehind
    ("/api/(unclosed", "missing )"),
], ids=["backreference", "lookahead", "lookbehind", "syntax"])
def test_non_re2_patterns_refused(pattern, why):
    for field in ("method", "path", "host"):
        errs = errors_of(l7_spec(f'[{{{field}: "{pattern}"}}]'))
        assert len(errs) == 1
        path, msg = errs[0]
        assert path == f"spec.ingress[0].toPorts[0].rules.http[0].{field}"
        assert msg.startswith("invalid regular expression (RE2 syntax)") and why in msg


def test_catastrophic_but_regular_pattern_accepted():
    """(a+)+$ is RE2 syntax (linear there); the proxy's PCRE2 bounds it by a match limit."""
    assert policy(l7_spec("[{path: '/(a+)+$'}]")).has_l7


@pytest.mark.parametrize("ports", ["[{port: '0', protocol: TCP}]",
                                   "[{port: '80', endPort: 90, protocol: TCP}]",
                                   "[{port: '53', protocol: UDP}]"], ids=["zero", "range", "udp"])
def test_l7_needs_one_tcp_port(ports):
    spec = f"{{endpointSelector: {{}}, ingress: [{{toPorts: [{{ports: {ports}, rules: {{http: [{{}}]}}}}]}}]}}"
    [(path, msg)] = errors_of(spec)
    assert path == "spec.ingress[0].toPorts[0].ports[0]" and "one TCP port" in msg


def test_bad_header_refused():
    errs = errors_of(l7_spec("[{headers: ['bad header', 'X-Ok: fine']}]"))
    assert errs == [("spec.ingress[0].toPorts[0].rules.http[0].headers[0]",
                     "'bad header' is not a valid header")]


# compiler ---------------------------------------------------------------------------

def test_rule_set_per_peer():
    w = World(**WEB).apply(policy(l7_spec("[{method: GET, path: '/a'}, {method: POST}]")))
    api, web = w.ids["api"], w.ids["web"]
    assert w.c.l7 == {L7Key(api, INGRESS, 8080, web): frozenset({HTTPRule("GET", "/a"),
                                                                  HTTPRule("POST")})}
    # and the L4 entry lets the peer reach the proxy path at all
    assert w.ok("web", "api", port=8080) and not w.ok("other", "api", port=8080)


def test_l4_only_rule_on_same_port_is_unfiltered_for_that_peer():
    extra = (", {fromEndpoints: [{matchLabels: {app: other}}], "
             "toPorts: [{ports: [{port: '8000', endPort: 9000, protocol: TCP}]}]}")
    spec = l7_spec("[{method: GET}]", peers=None, extra=extra)
    w = World(**WEB).apply(policy(spec))
    api, other = w.ids["api"], w.ids["other"]
    assert w.c.l7[L7Key(api, INGRESS, 8080, ANY_PEER)] == frozenset({HTTPRule("GET")})
    assert w.c.l7[L7Key(api, INGRESS, 8080, other)] == frozenset({ALL_HTTP})


def test_exact_peer_gets_any_peer_rules_too():
    extra = (", {fromEndpoints: [{matchLabels: {app: web}}], "
             "toPorts: [{ports: [{port: '8080', protocol: TCP}], rules: {http: [{method: PUT}]}}]}")
    w = World(**WEB).apply(policy(l7_spec("[{method: GET}]", peers=None, extra=extra)))
    api, web = w.ids["api"], w.ids["web"]
    assert w.c.l7[L7Key(api, INGRESS, 8080, web)] == frozenset({HTTPRule("GET"), HTTPRule("PUT")})


def test_rule_sets_name_the_policies_behind_them():
    """l7_policies: the policies whose clauses make a key's rule set (the proxy logs its
    number, so an L7 flow names them): an exact peer's include the any-peer ones."""
    every = policy(l7_spec("[{method: GET}]", peers=None), name="every")
    webs = policy(l7_spec("[{method: PUT}]"), name="webs")
    deny = policy("{endpointSelector: {matchLabels: {app: api}}, ingressDeny: "
                  "[{fromEndpoints: [{matchLabels: {app: other}}]}]}", name="deny")
    w = World(**WEB).apply(every, webs, deny)
    api, web = w.ids["api"], w.ids["web"]
    assert w.c.l7_policies(L7Key(api, INGRESS, 8080, web)) == ("every", "webs")
    assert w.c.l7_policies(L7Key(api, INGRESS, 8080, ANY_PEER)) == ("every",)
    assert w.c.l7_policies(L7Key(api, INGRESS, 9090, web)) == ()


def test_visibility_only():
    w = World(**WEB).apply(policy(l7_spec("[{}]")))
    assert set(w.c.l7.values()) == {frozenset({ALL_HTTP})}


def test_deny_rule_peer_has_no_rule_set():
    extra = ""
    spec = l7_spec("[{method: GET}]", peers=None, extra=extra)
    w = World(**WEB).apply(policy(spec), policy(
        "{endpointSelector: {matchLabels: {app: api}}, ingressDeny: [{fromEndpoints: "
        "[{matchLabels: {app: other}}], toPorts: [{ports: [{port: '8080', protocol: TCP}]}]}]}",
        name="deny"))
    assert not w.ok("other", "api", port=8080) and w.ok("web", "api", port=8080)
    assert all(k.peer != w.ids["other"] for k in w.c.l7)


def test_delta_carries_l7_changes_and_inverts():
    w = World(**WEB)
    d1 = w.c.set_policy(policy(l7_spec("[{method: GET}]")))
    key = L7Key(w.ids["api"], INGRESS, 8080, w.ids["web"])
    assert d1.l7 == {key: frozenset({HTTPRule("GET")})}
    d2 = w.c.set_policy(policy(l7_spec("[{method: POST}]")))
    assert d2.l7 == {key: frozenset({HTTPRule("POST")})} and d2.prior_l7[key] == frozenset({HTTPRule("GET")})
    inv = d2.inverse()
    assert inv.l7 == {key: frozenset({HTTPRule("GET")})}
    d3 = w.c.remove_policy(policy(l7_spec("[]")).ref)
    assert d3.l7 == {key: None} and not w.c.l7


def test_identity_changes_update_rule_sets_incrementally():
    c = Compiler()
    for r in reserved_identities():
        c.add_identity(r)
    alloc = IdentityAllocator()
    api = alloc.workload(LabelSet.parse("app=api"))
    c.add_identity(api, local=True)
    c.set_policy(policy(l7_spec("[{path: '/x'}]")))
    assert not c.l7
    web = alloc.workload(LabelSet.parse("app=web"))
    d = c.add_identity(web)
    assert d.l7 == {L7Key(api.id, INGRESS, 8080, web.id): frozenset({HTTPRule(path="/x")})}
    d = c.remove_identity(web.id)
    assert d.l7 == {L7Key(api.id, INGRESS, 8080, web.id): None} and not c.l7
    # the same state as from scratch
    c.add_identity(web)
    fresh = Compiler()
    for ident in list(reserved_identities()) + [web]:
        fresh.add_identity(ident)
    fresh.add_identity(api, local=True)
    fresh.set_policies(c.policies.values())
    assert fresh.l7 == c.l7
    entries, _ = full_compile(list(c.policies.values()), list(reserved_identities()) + [api, web], {api.id})
    assert entries == c.entries


def test_documents_roundtrip_through_yaml():
    doc = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{}]}
""")
    assert sanitize_document(doc).rules[0].ingress[0].to_ports[0].http == (ALL_HTTP,)
