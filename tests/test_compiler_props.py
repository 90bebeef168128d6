"""Property tests of the compiler.

1. The engine agrees with an independent reference (tests/reference_policy.py): random
   policies and identities are compiled and looked up as the datapath does, and every
   answer must equal the naive evaluator's, written from Cilium's documented semantics.
2. Incremental deltas always equal a full recompile.
"""
import ipaddress

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reference_policy import Conn, Ident, Reference
from stockade.errors import PolicyErrors
from stockade.policy.api.validation import sanitize_document
from stockade.policy.compiler import Compiler, full_compile
from stockade.policy.identity import IdentityAllocator, reserved_identities
from stockade.policy.labels import Label, LabelSet
from stockade.policy.mapstate import EGRESS, INGRESS, lookup

SETTINGS = dict(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# identities ------------------------------------------------------------------------
VALUES = {"app": ["web", "db", "api"], "env": ["prod", "dev"], "tier": ["front", "back"],
          "namespace": ["prod", "dev"], "io.kubernetes.pod.namespace": ["prod", "dev"],
          "service": ["web", "backup"]}
LABEL_SOURCES = ["unspec", "container", "k8s"]
CIDR_IDENTITIES = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.0.2.0/24",
                   "192.0.2.128/25", "2001:db8::/32", "2001:db8:1::/48"]
SERVICE_CIDR = ("198.51.100.0/24", {"service": "backup", "tier": "back"})


def _label(key):
    return st.builds(lambda src, v: Label(src, key, v), st.sampled_from(LABEL_SOURCES),
                     st.sampled_from(VALUES[key]))


workload_st = st.builds(
    lambda app, extra, ns: LabelSet([app, *extra, *ns]),
    _label("app"),
    st.lists(st.one_of(_label("env"), _label("tier"), _label("service")), max_size=2,
             unique_by=lambda l: l.key),
    st.lists(st.one_of(_label("namespace"), _label("io.kubernetes.pod.namespace")), max_size=1))
# (labels, local): remote workloads are peers only
workloads_st = st.lists(st.tuples(workload_st, st.booleans()), min_size=1, max_size=4)

# policies --------------------------------------------------------------------------
SELECTOR_KEYS = ["app", "container:app", "k8s:app", "any:env", "env", "tier", "namespace",
                 "io.kubernetes.pod.namespace", "k8s:io.kubernetes.pod.namespace",
                 "container:namespace", "service"]


def _values(key):
    return VALUES[key.rpartition(":")[2]]


label_key_st = st.sampled_from(SELECTOR_KEYS)
match_labels_st = st.dictionaries(label_key_st, st.just(None), max_size=2).flatmap(
    lambda d: st.fixed_dictionaries({k: st.sampled_from(_values(k)) for k in d}))


def _expression(key, op):
    if op in ("Exists", "DoesNotExist"):
        return st.just({"key": key, "operator": op})
    values = _values(key) if not key.startswith("reserved:") else [""]
    return st.builds(lambda vs: {"key": key, "operator": op, "values": vs},
                     st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True))


def expressions_st(peer):
    keys = SELECTOR_KEYS + (["reserved:host", "reserved:world"] if peer else [])
    one = st.tuples(st.sampled_from(keys), st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    return st.lists(one.flatmap(lambda ko: _expression(*ko)), min_size=1, max_size=2)


def selector_st(peer):
    options = [
        st.just({}),
        st.builds(lambda m: {"matchLabels": m}, match_labels_st),
        st.builds(lambda e: {"matchExpressions": e}, expressions_st(peer)),
        st.builds(lambda m, e: {"matchLabels": m, "matchExpressions": e}, match_labels_st,
                  expressions_st(peer)),
    ]
    if peer:
        options.append(st.sampled_from([{"matchLabels": {"reserved:host": ""}},
                                        {"matchLabels": {"reserved:world": ""}}]))
    return st.one_of(options)


ENTITY_NAMES = ["all", "world", "cluster", "host", "remote-node", "health", "init", "unmanaged"]
RULE_CIDRS = ["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "10.1.2.3", "0.0.0.0/0",
              "2001:db8::/32", "::/0"]
RULE_CIDR_SETS = [
    {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]},
    {"cidr": "10.0.0.0/8", "except": ["10.1.2.0/24"]},
    {"cidr": "10.1.0.0/16"},
    {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]},
    {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]},
    {"cidr": "2001:db8::/32", "except": ["2001:db8:1::/48"]},
    {"cidrGroupRef": "backup"},
]


def _port(number, end, proto):
    out = {}
    if number is not None:
        out["port"] = number
    if end is not None:
        out["endPort"] = end
    if proto is not None:
        out["protocol"] = proto
    return out


port_st = st.one_of(
    st.builds(_port, st.sampled_from(["80", "443", "53", "5432", "0", 80, None]), st.none(),
              st.sampled_from(["TCP", "UDP", "SCTP", "ANY", "tcp", None])),
    st.builds(lambda r, proto: _port(r[0], r[1], proto),
              st.sampled_from([("8000", 8100), ("1", 1023), ("80", 80), (5432, 5433), ("1024", 65535)]),
              st.sampled_from(["TCP", "UDP", "ANY", None])))
to_ports_st = st.lists(st.builds(lambda ps: {"ports": ps}, st.lists(port_st, min_size=1, max_size=2)),
                       min_size=1, max_size=2)
ICMP_FIELDS = [{"type": 8}, {"type": "EchoRequest"}, {"type": 0}, {"type": "EchoReply"},
               {"type": "13"}, {"type": 128, "family": "IPv6"},
               {"type": "EchoRequest", "family": "IPv6"}]
icmps_st = st.lists(st.builds(lambda fs: {"fields": fs},
                              st.lists(st.sampled_from(ICMP_FIELDS), min_size=1, max_size=2)),
                    min_size=1, max_size=1)


def _maybe_empty(items):
    """A peer list, sometimes written as an explicit ``[]`` (issue 12: selects no peer)."""
    return st.one_of(st.lists(items, min_size=1, max_size=2), st.just([]))


def peer_rule_st(pre):
    """One element: at most one peer kind, and toPorts or icmps, not both (the shapes
    Cilium refuses to combine are refused by the parser)."""
    peers = st.one_of(
        st.just({}),
        st.builds(lambda v: {f"{pre}Endpoints": v}, _maybe_empty(selector_st(peer=True))),
        st.builds(lambda v: {f"{pre}Entities": v}, _maybe_empty(st.sampled_from(ENTITY_NAMES))),
        st.builds(lambda v: {f"{pre}CIDR": v}, _maybe_empty(st.sampled_from(RULE_CIDRS))),
        st.builds(lambda v: {f"{pre}CIDRSet": v}, _maybe_empty(st.sampled_from(RULE_CIDR_SETS))))
    l4 = st.one_of(st.just({}), st.builds(lambda v: {"toPorts": v}, to_ports_st),
                   st.builds(lambda v: {"icmps": v}, icmps_st))
    return st.builds(lambda a, b: {**a, **b}, peers, l4)


spec_st = st.fixed_dictionaries({"endpointSelector": selector_st(peer=False)}, optional={
    "ingress": st.lists(peer_rule_st("from"), max_size=2),
    "egress": st.lists(peer_rule_st("to"), max_size=2),
    "ingressDeny": st.lists(peer_rule_st("from"), max_size=2),
    "egressDeny": st.lists(peer_rule_st("to"), max_size=2),
    "enableDefaultDeny": st.fixed_dictionaries({}, optional={"ingress": st.booleans(),
                                                             "egress": st.booleans()}),
})
# (kind, namespace): cluster-wide, plain CNP, namespaced CNPs
SCOPES = [("CiliumClusterwideNetworkPolicy", None), ("CiliumNetworkPolicy", None),
          ("CiliumNetworkPolicy", "prod"), ("CiliumNetworkPolicy", "dev")]
document_st = st.builds(
    lambda scope, specs: (scope, specs),
    st.sampled_from(SCOPES), st.lists(spec_st, min_size=1, max_size=2))


def make_policy(name, scope, specs):
    kind, namespace = scope
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    doc = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta}
    if len(specs) == 1:
        doc["spec"] = specs[0]
    else:
        doc["specs"] = specs
    try:
        return sanitize_document(doc)
    except PolicyErrors as exc:
        # A namespaced policy naming another namespace in its endpointSelector is refused.
        assume("selects only workloads of that namespace" not in str(exc))
        raise


# the world both evaluators see --------------------------------------------------------
def policy_prefixes(policies):
    for p in policies:
        for r in p.rules:
            for pr in (*r.ingress, *r.egress, *r.ingress_deny, *r.egress_deny):
                for c in pr.cidrs:
                    if c.cidr is not None:
                        yield c.cidr
                        yield from c.excepts


def identities_for(alloc, policies, workloads):
    """Reserved identities, CIDR identities (fixed ones, an inventory service's and every
    prefix a policy names) and the workloads: [(Identity, local)]."""
    out = [(r, False) for r in reserved_identities()]
    prefixes = {ipaddress.ip_network(p) for p in CIDR_IDENTITIES} | set(policy_prefixes(policies))
    for prefix in sorted(prefixes, key=lambda n: (n.version, int(n.network_address), n.prefixlen)):
        out.append((alloc.cidr(prefix), False))
    svc_prefix, svc_labels = SERVICE_CIDR
    out.append((alloc.cidr(ipaddress.ip_network(svc_prefix),
                           LabelSet(Label("service", k, v) for k, v in svc_labels.items())), False))
    seen = set()
    for labels, local in workloads:
        ident = alloc.workload(labels)
        if ident.id not in seen:
            seen.add(ident.id)
            out.append((ident, local))
    return out


def as_reference(ident):
    return Ident(ident.id, ident.kind, tuple(tuple(l) for l in ident.labels),
                 str(ident.prefix) if ident.prefix is not None else None)


def probes(policies):
    """(proto, port) pairs to try: a fixed set plus the edges and middle of every port
    range and the ICMP types the policies name."""
    out = {(6, 80), (6, 443), (17, 53), (132, 53), (6, 5432), (1, 8), (1, 13), (58, 128),
           (47, 0), (6, None), (17, None), (1, None), (6, 65535)}
    for p in policies:
        for r in p.rules:
            for pr in (*r.ingress, *r.egress, *r.ingress_deny, *r.egress_deny):
                for port_rule in pr.to_ports:
                    for pp in port_rule.ports:
                        last = pp.end_port or pp.port
                        for proto in (6, 17, 132):
                            edges = (pp.port - 1, pp.port, (pp.port + last) // 2, last, last + 1)
                            out.update((proto, n) for n in edges if 0 < n <= 65535)
                for f in pr.icmps:
                    out.update(((1, f.type), (58, f.type), (1, f.type + 1)))
    return sorted(out, key=lambda x: (x[0], -1 if x[1] is None else x[1]))


def describe(policies):
    return "\n".join(f"{p.ref.display}: {p.document}" for p in policies)


@settings(max_examples=300, **SETTINGS)
@given(docs=st.lists(document_st, min_size=1, max_size=3), workloads=workloads_st,
       mode=st.sampled_from(["default", "default", "default", "always", "never"]),
       policies_first=st.booleans())
def test_engine_agrees_with_reference(docs, workloads, mode, policies_first):
    policies = [make_policy(f"p{i}", scope, specs) for i, (scope, specs) in enumerate(docs)]
    idents = identities_for(IdentityAllocator(), policies, workloads)
    c = Compiler(mode)
    if policies_first:
        c.set_policies(policies)
    for ident, local in idents:
        c.add_identity(ident, local=local)
    if not policies_first:
        c.set_policies(policies)
    ref = Reference(policies, [as_reference(i) for i, _ in idents], mode)
    l4 = probes(policies)
    for local, _ in (x for x in idents if x[1]):
        for peer, _ in idents:
            for direction, dname in ((INGRESS, "ingress"), (EGRESS, "egress")):
                for proto, port in l4:
                    got, _ = lookup(c.entries, c.flags, local.id, peer.id, direction, proto, port)
                    want = ref.verdict(Conn(local.id, peer.id, dname, proto, port))
                    assert got == want, (
                        f"{dname} of {local.labels} with peer {peer.labels} ({peer.kind}), "
                        f"proto {proto} port {port}, mode {mode}: engine {got}, "
                        f"reference {want}\n{describe(policies)}")


op_st = st.one_of(
    st.tuples(st.just("add"), workload_st, st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 20)),
    st.tuples(st.just("policy"), st.sampled_from(["p1", "p2", "p3"]), document_st),
    st.tuples(st.just("delete"), st.sampled_from(["p1", "p2", "p3"])),
)


@settings(max_examples=150, **SETTINGS)
@given(ops=st.lists(op_st, min_size=1, max_size=12),
       enforcement=st.sampled_from(["default", "default", "always"]))
def test_incremental_equals_full(ops, enforcement):
    alloc = IdentityAllocator()
    c = Compiler(enforcement)
    idents = {}
    for ident, _ in identities_for(alloc, [], []):
        idents[ident.id] = ident
        c.add_identity(ident)
    local: set[int] = set()
    added: set[int] = set()
    policies = {}
    shadow, shadow_flags = {}, {}
    for op in ops:
        if op[0] == "add":
            ident = alloc.workload(op[1])
            if ident.id in added:
                continue
            idents[ident.id] = ident
            added.add(ident.id)
            if op[2]:
                local.add(ident.id)
            delta = c.add_identity(ident, local=op[2])
        elif op[0] == "remove":
            if not added:
                continue
            victim = sorted(added)[op[1] % len(added)]
            added.discard(victim)
            local.discard(victim)
            del idents[victim]
            delta = c.remove_identity(victim)
        elif op[0] == "policy":
            p = make_policy(op[1], *op[2])
            for prefix in policy_prefixes([p]):
                ident = alloc.cidr(prefix)
                if ident.id not in idents:
                    idents[ident.id] = ident
                    delta = c.add_identity(ident)
                    delta.apply(shadow, shadow_flags)
            policies = {r: q for r, q in policies.items() if r.name != op[1]}
            policies[p.ref] = p
            stale = [r for r in c.policies if r.name == op[1] and r != p.ref]
            delta = c.set_policies([p], remove=stale)
        else:
            ref = next((r for r in policies if r.name == op[1]), None)
            if ref is None:
                continue
            del policies[ref]
            delta = c.remove_policy(ref)
        assert not (set(delta.adds) & delta.removes)
        delta.apply(shadow, shadow_flags)
        full, full_flags = full_compile(list(policies.values()), list(idents.values()), local, enforcement)
        assert shadow == full
        assert shadow_flags == full_flags
        assert c.entries == full
