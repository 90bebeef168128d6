"""Compiler semantics, checked by pushing packets through the fake datapath."""
import pytest
import yaml

from fake_datapath import FakeDatapath
from stockade.policy.api.validation import sanitize_document
from stockade.policy.compiler import Compiler
from stockade.policy.identity import IdentityAllocator, reserved_identities
from stockade.policy.labels import LabelSet
from stockade.policy.mapstate import (
    INGRESS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    Key,
    diff,
    lookup,
)

TCP, UDP, SCTP, ICMP, ICMP6 = PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP, PROTO_ICMPV6
HOST, WORLD = 1, 2


def policy(spec, name="p", kind="CiliumNetworkPolicy", namespace=None):
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    doc = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta,
           "spec": yaml.safe_load(spec) if isinstance(spec, str) else spec}
    return sanitize_document(doc)


class World:
    """Identities by name plus a compiler and a fake datapath."""

    def __init__(self, enforcement="default", **workloads):
        self.c = Compiler(enforcement)
        self.alloc = IdentityAllocator()
        for r in reserved_identities():
            self.c.add_identity(r)
        self.ids = {"host": HOST, "world": WORLD}
        for name, labels in workloads.items():
            ident = self.alloc.workload(LabelSet.parse(labels))
            self.c.add_identity(ident, local=True)
            self.ids[name] = ident.id
        self.dp = FakeDatapath(self.c)

    def cidr(self, name, prefix):
        import ipaddress
        ident = self.alloc.cidr(ipaddress.ip_network(prefix))
        self.c.add_identity(ident)
        self.ids[name] = ident.id

    def apply(self, *policies):
        for p in policies:
            self.c.set_policy(p)
        return self

    def ok(self, src, dst, proto=TCP, port=80):
        return self.dp.allowed(self.ids[src], self.ids[dst], proto, port)


WEB_DB = dict(web="app=web", db="app=db", other="app=other")

CASES = [
    # (id, policy spec, src, dst, proto, port, expected)
    ("no-policy-allows", None, "web", "db", TCP, 5432, True),
    ("label-and-port", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: '5432', protocol: TCP}]}]}]}",
     "web", "db", TCP, 5432, True),
    ("wrong-port", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: '5432', protocol: TCP}]}]}]}",
     "web", "db", TCP, 5433, False),
    ("wrong-proto", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: '5432', protocol: TCP}]}]}]}",
     "web", "db", UDP, 5432, False),
    ("wrong-peer", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]}",
     "other", "db", TCP, 5432, False),
    ("l3-only-allows-all-ports", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]}",
     "web", "db", UDP, 9, True),
    ("l3-only-allows-icmp", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]}",
     "web", "db", ICMP, 8, True),
    ("port-range-inside", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: '8000', endPort: 8100, protocol: TCP}]}]}]}",
     "web", "db", TCP, 8057, True),
    ("port-range-edge", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: '8000', endPort: 8100, protocol: TCP}]}]}]}",
     "web", "db", TCP, 8100, True),
    ("port-range-outside", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}], toPorts: [{ports: [{port: '8000', endPort: 8100, protocol: TCP}]}]}]}",
     "web", "db", TCP, 8101, False),
    ("any-proto-tcp", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{toPorts: [{ports: [{port: '53'}]}]}]}",
     "web", "db", TCP, 53, True),
    ("any-proto-sctp", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{toPorts: [{ports: [{port: '53'}]}]}]}",
     "web", "db", SCTP, 53, True),
    ("any-proto-not-icmp", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{toPorts: [{ports: [{port: '0'}]}]}]}",
     "web", "db", ICMP, 8, False),
    ("l4-only-any-peer-world", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]}",
     "world", "db", TCP, 80, True),
    ("empty-selector-not-world", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}]}]}",
     "world", "db", TCP, 80, False),
    ("empty-selector-not-host", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}]}]}",
     "host", "db", TCP, 80, False),
    ("entity-host", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEntities: [host]}]}",
     "host", "db", TCP, 80, True),
    ("entity-world", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEntities: [world]}]}",
     "world", "db", TCP, 80, True),
    ("entity-world-not-workload", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEntities: [world]}]}",
     "web", "db", TCP, 80, False),
    ("entity-cluster-workload", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEntities: [cluster]}]}",
     "web", "db", TCP, 80, True),
    ("entity-cluster-host", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEntities: [cluster]}]}",
     "host", "db", TCP, 80, True),
    ("entity-cluster-not-world", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEntities: [cluster]}]}",
     "world", "db", TCP, 80, False),
    ("entity-all", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEntities: [all]}]}",
     "world", "db", UDP, 1, True),
    ("egress-default-deny", "{endpointSelector: {matchLabels: {app: web}}, egress: [{toEndpoints: [{matchLabels: {app: db}}]}]}",
     "web", "other", TCP, 80, False),
    ("egress-allow", "{endpointSelector: {matchLabels: {app: web}}, egress: [{toEndpoints: [{matchLabels: {app: db}}]}]}",
     "web", "db", TCP, 80, True),
    ("ingress-rules-leave-egress-open", "{endpointSelector: {matchLabels: {app: web}}, ingress: [{}]}",
     "web", "other", TCP, 80, True),
    ("empty-ingress-rule-denies-all", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{}]}",
     "web", "db", TCP, 80, False),
    ("deny-beats-allow", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}]}], ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: '5432', protocol: TCP}]}]}]}",
     "web", "db", TCP, 5432, False),
    ("deny-only-that-port", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}]}], ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: '5432', protocol: TCP}]}]}]}",
     "web", "db", TCP, 80, True),
    ("broad-deny-beats-narrow-allow", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}], ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}]}]}",
     "web", "db", TCP, 80, False),
    ("any-peer-deny-beats-exact-allow", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}], ingressDeny: [{toPorts: [{ports: [{port: '22', protocol: TCP}]}]}]}",
     "web", "db", TCP, 22, False),
    ("deny-only-policy-is-default-deny", "{endpointSelector: {matchLabels: {app: db}}, ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}]}]}",
     "other", "db", TCP, 80, False),
    ("opt-out-default-deny", "{endpointSelector: {matchLabels: {app: db}}, enableDefaultDeny: {ingress: false}, ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}]}]}",
     "other", "db", TCP, 80, True),
    ("opt-out-still-denies", "{endpointSelector: {matchLabels: {app: db}}, enableDefaultDeny: {ingress: false}, ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}]}]}",
     "web", "db", TCP, 80, False),
    ("icmp-by-name", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}], icmps: [{fields: [{type: EchoRequest}]}]}]}",
     "web", "db", ICMP, 8, True),
    ("icmp-other-type", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}], icmps: [{fields: [{type: EchoRequest}]}]}]}",
     "web", "db", ICMP, 13, False),
    ("icmpv6", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}], icmps: [{fields: [{type: 128, family: IPv6}]}]}]}",
     "web", "db", ICMP6, 128, True),
    ("icmp-not-tcp", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}], icmps: [{fields: [{type: 8}]}]}]}",
     "web", "db", TCP, 8, False),
    ("match-expressions-notin", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}]}]}",
     "other", "db", TCP, 80, True),
    ("match-expressions-notin-excludes", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}]}]}",
     "web", "db", TCP, 80, False),
    ("source-prefix-mismatch", "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {container:app: web}}]}]}",
     "web", "db", TCP, 80, False),
    ("selector-any-prefix", "{endpointSelector: {matchLabels: {any:app: db}}, ingress: [{fromEndpoints: [{matchLabels: {any:app: web}}]}]}",
     "web", "db", TCP, 80, True),
]


@pytest.mark.parametrize("spec,src,dst,proto,port,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_semantics(spec, src, dst, proto, port, expected):
    w = World(**WEB_DB)
    if spec:
        w.apply(policy(spec))
    assert w.ok(src, dst, proto, port) is expected


def test_allows_combine_as_union():
    w = World(**WEB_DB).apply(
        policy("{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]}", "a"),
        policy("{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: other}}]}]}", "b"))
    assert w.ok("web", "db", TCP, 80) and w.ok("other", "db", UDP, 53)
    assert not w.ok("web", "db", UDP, 53)


def test_default_deny_if_any_policy_asks():
    opt_out = policy("{endpointSelector: {matchLabels: {app: db}}, enableDefaultDeny: {ingress: false}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]}", "a")
    strict = policy("{endpointSelector: {}, ingress: [{fromEntities: [host]}]}", "b")
    w = World(**WEB_DB).apply(opt_out)
    assert w.ok("other", "db")
    w.apply(strict)
    assert not w.ok("other", "db") and w.ok("web", "db") and w.ok("host", "db")


@pytest.mark.parametrize("mode,src,dst,expected", [
    ("always", "web", "other", False),   # no policy selects other: still default-deny
    ("always", "other", "web", False),
    ("never", "other", "db", True),      # policy ignored
    ("never", "web", "db", True),        # deny ignored too
    ("default", "web", "other", True),
], ids=["always-egress", "always-ingress", "never-allow", "never-deny", "default"])
def test_enforcement_modes(mode, src, dst, expected):
    w = World(mode, **WEB_DB).apply(policy(
        "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: other}}]}], ingressDeny: [{fromEndpoints: [{matchLabels: {app: web}}]}]}"))
    assert w.ok(src, dst) is expected


def test_cidr_with_except():
    w = World(**WEB_DB)
    p = policy("{endpointSelector: {matchLabels: {app: web}}, egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]}]}")
    for name, prefix in (("ten", "10.0.0.0/8"), ("ten-one", "10.1.0.0/16"), ("ten-two-host", "10.2.3.4/32")):
        w.cidr(name, prefix)
    w.apply(p)
    assert w.ok("web", "ten") and w.ok("web", "ten-two-host")
    assert not w.ok("web", "ten-one")
    assert not w.ok("web", "world")


def test_cidr_zero_selects_world():
    w = World(**WEB_DB)
    w.cidr("zero", "0.0.0.0/0")
    w.apply(policy("{endpointSelector: {matchLabels: {app: web}}, egress: [{toCIDR: [0.0.0.0/0]}]}"))
    assert w.ok("web", "world") and not w.ok("web", "db")


def test_world_entity_selects_cidr_identities():
    w = World(**WEB_DB)
    w.cidr("net", "192.0.2.0/24")
    w.apply(policy("{endpointSelector: {matchLabels: {app: web}}, egress: [{toEntities: [world]}]}"))
    assert w.ok("web", "net") and w.ok("web", "world") and not w.ok("web", "db")


def test_namespaced_policy_adds_namespace_constraint():
    w = World(a="app=db,namespace=prod", b="app=db,namespace=dev", web="app=web,namespace=prod",
              webdev="app=web,namespace=dev")
    w.apply(policy("{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]}",
                   namespace="prod"))
    assert w.ok("web", "a") and not w.ok("webdev", "a")
    assert w.ok("webdev", "b")  # the dev db is not selected: no policy, allowed


def test_non_first_fragment_gets_no_port_allow():
    w = World(**WEB_DB).apply(policy(
        "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: '53', protocol: UDP}]}]}]}"))
    assert w.dp.allowed(w.ids["web"], w.ids["db"], UDP, 53)
    assert not w.dp.allowed(w.ids["web"], w.ids["db"], UDP, None)


def test_entries_name_their_policies():
    w = World(**WEB_DB).apply(
        policy("{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]}", "one"),
        policy("{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]}", "two"))
    key = Key(w.ids["db"], w.ids["web"], INGRESS)
    assert w.c.entries[key].policies == {"one", "two"}


def test_removing_policy_restores_open():
    w = World(**WEB_DB)
    p = policy("{endpointSelector: {matchLabels: {app: db}}, ingress: [{}]}")
    w.apply(p)
    assert not w.ok("web", "db")
    delta = w.c.remove_policy(p.ref)
    assert delta.flags and w.ok("web", "db") and not w.c.entries and not w.c.flags


def test_new_identity_gets_existing_policy():
    w = World(**WEB_DB).apply(policy(
        "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {role: client}}]}]}"))
    ident = w.alloc.workload(LabelSet.parse("app=new,role=client"))
    delta = w.c.add_identity(ident, local=True)
    assert Key(w.ids["db"], ident.id, INGRESS) in delta.adds
    w.ids["new"] = ident.id
    assert w.ok("new", "db")
    delta = w.c.remove_identity(ident.id)
    assert Key(w.ids["db"], ident.id, INGRESS) in delta.removes


def test_delta_adds_and_removes_are_disjoint():
    w = World(**WEB_DB)
    old = dict(w.c.entries)
    d = w.c.set_policy(policy("{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{}]}]}"))
    assert not (set(d.adds) & d.removes)
    assert diff(old, w.c.entries).adds == d.adds


def test_l7_kept_when_allowed():
    p = policy("{endpointSelector: {}, ingress: [{toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET, path: '/api/.*'}]}}]}]}")
    assert p.has_l7 and p.rules[0].ingress[0].to_ports[0].http[0].method == "GET"


def test_lookup_reports_deciding_keys():
    w = World(**WEB_DB).apply(policy(
        "{endpointSelector: {matchLabels: {app: db}}, ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]}"))
    verdict, keys = lookup(w.c.entries, w.c.flags, w.ids["db"], w.ids["web"], INGRESS, TCP, 80)
    assert verdict == "allow" and keys[0].describe() == "80/tcp"
