"""Property tests: incremental deltas always equal a full recompile."""
import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.policy.api.validation import sanitize_document
from stockade.policy.compiler import Compiler, full_compile
from stockade.policy.identity import IdentityAllocator, reserved_identities
from stockade.policy.labels import LabelSet

APPS = ["web", "db", "api", "cache"]
ENVS = ["prod", "dev"]
CIDRS = ["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24"]

labels_st = st.fixed_dictionaries({"app": st.sampled_from(APPS)},
                                  optional={"env": st.sampled_from(ENVS)})
selector_st = st.one_of(
    st.builds(lambda l: {"matchLabels": l}, labels_st),
    st.builds(lambda a: {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [a]}]},
              st.sampled_from(APPS)),
    st.just({}),
)
port_st = st.one_of(
    st.builds(lambda p, proto: {"port": p, "protocol": proto},
              st.sampled_from(["0", "80", "443", "5432", "8000"]), st.sampled_from(["TCP", "UDP", "ANY"])),
    st.builds(lambda e, proto: {"port": "8000", "endPort": e, "protocol": proto},
              st.sampled_from([8080, 9000]), st.sampled_from(["TCP", "UDP", "ANY"])))
ports_st = st.lists(port_st, min_size=1, max_size=2)


def peer_rule(direction):
    """One rule element: at most one peer kind (Cilium refuses to combine them),
    sometimes given as an empty list (selects no peer)."""
    pre = "from" if direction == "in" else "to"
    peers = st.one_of(
        st.just({}),
        st.builds(lambda v: {f"{pre}Endpoints": v}, st.lists(selector_st, max_size=2)),
        st.builds(lambda v: {f"{pre}Entities": v},
                  st.lists(st.sampled_from(["world", "host", "cluster", "all"]), max_size=2)),
        st.builds(lambda v: {f"{pre}CIDR": v}, st.lists(st.sampled_from(CIDRS), max_size=1)))
    l4 = st.fixed_dictionaries({}, optional={"toPorts": st.builds(lambda p: [{"ports": p}], ports_st)})
    return st.builds(lambda a, b: {**a, **b}, peers, l4)


spec_st = st.fixed_dictionaries({"endpointSelector": selector_st}, optional={
    "ingress": st.lists(peer_rule("in"), max_size=2),
    "egress": st.lists(peer_rule("out"), max_size=2),
    "ingressDeny": st.lists(peer_rule("in"), max_size=1),
    "egressDeny": st.lists(peer_rule("out"), max_size=1),
    "enableDefaultDeny": st.fixed_dictionaries({}, optional={"ingress": st.booleans(), "egress": st.booleans()}),
})


def make_policy(name, spec):
    return sanitize_document({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                              "metadata": {"name": name}, "spec": spec})


op_st = st.one_of(
    st.tuples(st.just("add"), labels_st),
    st.tuples(st.just("remove"), st.integers(0, 20)),
    st.tuples(st.just("policy"), st.sampled_from(["p1", "p2", "p3"]), spec_st),
    st.tuples(st.just("delete"), st.sampled_from(["p1", "p2", "p3"])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, min_size=1, max_size=12),
       enforcement=st.sampled_from(["default", "default", "always"]))
def test_incremental_equals_full(ops, enforcement):
    alloc = IdentityAllocator()
    c = Compiler(enforcement)
    idents = {r.id: r for r in reserved_identities()}
    for r in idents.values():
        c.add_identity(r)
    for prefix in CIDRS:
        ident = alloc.cidr(ipaddress.ip_network(prefix))
        idents[ident.id] = ident
        c.add_identity(ident)
    local: set[int] = set()
    policies = {}
    shadow, shadow_flags = {}, {}
    for op in ops:
        if op[0] == "add":
            ident = alloc.workload(LabelSet.from_mapping(op[1]))
            if ident.id in local:
                continue
            idents[ident.id] = ident
            local.add(ident.id)
            delta = c.add_identity(ident, local=True)
        elif op[0] == "remove":
            if not local:
                continue
            victim = sorted(local)[op[1] % len(local)]
            local.discard(victim)
            del idents[victim]
            delta = c.remove_identity(victim)
        elif op[0] == "policy":
            p = make_policy(op[1], op[2])
            policies[p.ref] = p
            delta = c.set_policy(p)
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
