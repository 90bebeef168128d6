"""The agreement table (tests/agreement_cases.py) through the reference evaluator and the
offline trace: both must give the verdict worked out by hand."""
import ipaddress

import pytest

from agreement_cases import CASES
from reference_policy import Ident, Reference
from stockade.policy.api.loader import load_text
from stockade.policy.sel import parse_port, parse_sel
from stockade.policy.trace import Tracer

# Cilium's reserved identity numbers
RESERVED_IDS = {"host": 1, "world": 2, "unmanaged": 3, "health": 4, "init": 5, "remote-node": 6}
FIRST_CIDR_ID, FIRST_WORKLOAD_ID = 1 << 24, 256

ids = [c.name for c in CASES]


def load(case):
    return load_text(case.policies, f"{case.name}.yaml")


def policy_prefixes(policies):
    out = set()
    for p in policies:
        for r in p.rules:
            for pr in (*r.ingress, *r.egress, *r.ingress_deny, *r.egress_deny):
                for c in pr.cidrs:
                    if c.cidr is not None:
                        out.update((c.cidr, *c.excepts))
    return sorted(out, key=lambda n: (n.version, int(n.network_address), n.prefixlen))


class Universe:
    """The identities a case needs, as plain data: reserved ones, one per prefix the
    policies name (an address takes the most specific, or world), one per workload."""

    def __init__(self, policies):
        self.idents = [Ident(num, "reserved", (("reserved", name, ""),))
                       for name, num in RESERVED_IDS.items()]
        self.prefixes = {}
        for i, prefix in enumerate(policy_prefixes(policies)):
            ident = Ident(FIRST_CIDR_ID + i, "cidr",
                          (("cidr", str(prefix), ""), ("reserved", "world", "")), str(prefix))
            self.idents.append(ident)
            self.prefixes[prefix] = ident.id
        self.workloads = {}

    def identity_of(self, sel: str) -> int:
        spec = parse_sel(sel)
        if spec.kind == "entity":
            return RESERVED_IDS[spec.entity]
        if spec.kind == "cidr":
            addr = ipaddress.ip_network(spec.prefix)
            covering = [p for p in self.prefixes if p.version == addr.version and addr.subnet_of(p)]
            if not covering:
                return RESERVED_IDS["world"]
            return self.prefixes[max(covering, key=lambda p: p.prefixlen)]
        labels = tuple(sorted(tuple(l) for l in spec.labels))
        if labels not in self.workloads:
            ident = Ident(FIRST_WORKLOAD_ID + len(self.workloads), "workload", labels)
            self.workloads[labels] = ident.id
            self.idents.append(ident)
        return self.workloads[labels]


def test_table_is_well_formed():
    assert len(CASES) >= 60
    assert len(set(ids)) == len(ids), "case names must be unique"
    for case in CASES:
        assert case.expect in ("allow", "deny"), case.name
        assert case.why, case.name
        load(case)
        parse_port(case.port)
        for sel in (case.src, case.dst):
            parse_sel(sel)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_reference(case):
    policies = load(case)
    world = Universe(policies)
    src, dst = world.identity_of(case.src), world.identity_of(case.dst)
    proto, port = parse_port(case.port)
    assert Reference(policies, world.idents).connection(src, dst, proto, port) == case.expect, case.why


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_trace(case):
    proto, port = parse_port(case.port)
    result = Tracer(load(case)).trace(parse_sel(case.src), parse_sel(case.dst), proto, port)
    assert result["verdict"] == case.expect, (case.why, result["egress"], result["ingress"])
