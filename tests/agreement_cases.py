"""The agreement table: named connections whose verdict is worked out by hand from Cilium's
documented semantics (and Stockade's documented deviations, docs/policy.md).

Every evaluator of policy must give these answers: the reference evaluator and the
offline trace (tests/test_agreement_cases.py), and later real traffic, the live trace and
the web UI matrix. The table is plain data and knows nothing of how it is evaluated:

- ``policies``: one YAML text (several documents), loaded as a policy file;
- ``src``, ``dst``: SEL selectors (agent/stockade/policy/sel.py). A label selector is one
  workload with exactly those labels; at most two workloads a case. ``cidr:<address>`` is
  a host that is not a workload, at that address (an address in a test namespace);
  ``entity:host`` is the host itself; ``entity:world`` is any address no policy of the
  case names;
- ``port``: ``5432/tcp``, ``53/udp``, ``8/icmp`` (ICMP type);
- ``expect``: ``allow`` or ``deny`` for a new connection from src to dst, which needs the
  source's egress and the destination's ingress to let it through;
- ``why``: the reasoning behind ``expect``.

Policies run in enforcement mode ``default``. Cases marked issue 12 follow the semantics
being brought into the engine: an explicitly empty peer list selects no peer, and
``namespace`` equals ``io.kubernetes.pod.namespace`` whatever the source.
"""
from __future__ import annotations

from typing import NamedTuple


class Case(NamedTuple):
    name: str
    policies: str
    src: str
    dst: str
    port: str
    expect: str
    why: str


def _doc(kind: str, name: str, spec: str, namespace: str = "") -> str:
    ns = f"\n  namespace: {namespace}" if namespace else ""
    body = "".join(f"  {line}\n" for line in spec.strip("\n").splitlines())
    return f"---\napiVersion: cilium.io/v2\nkind: {kind}\nmetadata:\n  name: {name}{ns}\nspec:\n{body}"


def cnp(name: str, spec: str, namespace: str = "") -> str:
    return _doc("CiliumNetworkPolicy", name, spec, namespace)


def ccnp(name: str, spec: str) -> str:
    return _doc("CiliumClusterwideNetworkPolicy", name, spec)


# policies --------------------------------------------------------------------------
DB_FROM_WEB_5432 = cnp("db-from-web", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
DB_FROM_WEB_L3 = cnp("db-from-web-l3", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
""")
DB_RANGE = cnp("db-range", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: "8000", endPort: 8100, protocol: TCP}]}]
""")
DB_ANY_53 = cnp("db-any-53", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - toPorts: [{ports: [{port: "53"}]}]
""")
DB_ALL_PORTS_ANY = cnp("db-all-ports", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: "0"}]}]
""")
DB_EXPR_IN = cnp("db-in", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [web, api]}]}]
""")
DB_EXPR_NOTIN = cnp("db-notin", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}]
""")
DB_EXPR_EXISTS = cnp("db-exists", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchExpressions: [{key: env, operator: Exists}]}]
""")
DB_EXPR_DNE = cnp("db-dne", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchExpressions: [{key: env, operator: DoesNotExist}]}]
""")
DB_EXPR_COMBO = cnp("db-combo", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints:
      - matchLabels: {app: web}
        matchExpressions: [{key: env, operator: NotIn, values: [dev]}]
""")
DB_DENY_WEB_5432 = cnp("db-deny-web-5432", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{}]
ingressDeny:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
DB_BROAD_DENY = cnp("db-broad-deny", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
ingressDeny:
  - fromEndpoints: [{matchLabels: {app: web}}]
""")
DB_DENY_ONLY = cnp("db-deny-only", """
endpointSelector: {matchLabels: {app: db}}
ingressDeny:
  - fromEndpoints: [{matchLabels: {app: web}}]
""")
DB_DENY_ONLY_OPT_OUT = cnp("db-deny-only-opt-out", """
endpointSelector: {matchLabels: {app: db}}
enableDefaultDeny: {ingress: false}
ingressDeny:
  - fromEndpoints: [{matchLabels: {app: web}}]
""")
WEB_EGRESS_DENY_5432 = ccnp("web-egress-deny-5432", """
endpointSelector: {matchLabels: {app: web}}
egressDeny:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
WEB_EGRESS_DENY_5432_OPT_OUT = ccnp("web-egress-deny-5432-opt-out", """
endpointSelector: {matchLabels: {app: web}}
enableDefaultDeny: {egress: false}
egressDeny:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
DB_DENY_PING = cnp("db-deny-ping", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{}]
ingressDeny:
  - icmps: [{fields: [{type: EchoRequest}]}]
""")
WEB_EGRESS_DB_5432 = cnp("web-to-db", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
WEB_EGRESS_WORLD = cnp("web-to-world", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEntities: [world]
""")
WEB_EGRESS_HOST = cnp("web-to-host", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEntities: [host]
""")
DB_FROM_HOST = cnp("db-from-host", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEntities: [host]
""")
DB_FROM_CLUSTER = cnp("db-from-cluster", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEntities: [cluster]
""")
DB_FROM_ALL_80 = cnp("db-from-all-80", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEntities: [all]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
DB_FROM_ANY_WORKLOAD = cnp("db-from-workloads", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{}]
""")
WEB_EGRESS_CIDR_EXCEPT = cnp("web-to-ten", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
""")
DB_FROM_TESTNET_5432 = cnp("db-from-testnet", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromCIDR: [192.0.2.0/24]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
WEB_EGRESS_CIDR_ZERO = cnp("web-to-everywhere", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toCIDR: [0.0.0.0/0]
""")
WEB_EGRESS_WORLD_BUT_TESTNET = cnp("web-world-but-testnet", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEntities: [world]
egressDeny:
  - toCIDR: [192.0.2.0/24]
""")
DB_FROM_TESTNET_LOW_HALF = cnp("db-from-testnet-low", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromCIDRSet: [{cidr: 192.0.2.0/24, except: [192.0.2.128/25]}]
""")
DB_FROM_WEB_NS_PROD = cnp("db-from-web", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
""", namespace="prod")
DB_FROM_WEB_CLUSTERWIDE = ccnp("db-from-web", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
""")
DB_FROM_DEV_WEB_NS_PROD = cnp("db-from-dev-web", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web, namespace: dev}}]
""", namespace="prod")
DB_PING_ONLY = cnp("db-ping", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{}]
    icmps: [{fields: [{type: EchoRequest}]}]
""")
DB_OPT_OUT_AND_STRICT = (cnp("db-web-opt-out", """
endpointSelector: {matchLabels: {app: db}}
enableDefaultDeny: {ingress: false}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
""") + cnp("db-api-strict", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""))
DB_OPT_OUT_ONLY = cnp("db-web-opt-out", """
endpointSelector: {matchLabels: {app: db}}
enableDefaultDeny: {ingress: false}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
DB_UNION = (cnp("db-web-80", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""") + ccnp("db-api-any", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: api}}]
"""))
DB_EMPTY_ELEMENT = cnp("db-empty-element", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - {}
""")

# issue 12: explicitly empty peer lists select no peer
DB_EMPTY_FROM_ENDPOINTS = cnp("db-empty-endpoints", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: []
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
DB_EMPTY_FROM_ENTITIES = cnp("db-empty-entities", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEntities: []
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
DB_EMPTY_FROM_CIDR = cnp("db-empty-cidr", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromCIDR: []
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
DB_EMPTY_FROM_CIDRSET = cnp("db-empty-cidrset", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromCIDRSet: []
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
WEB_EMPTY_TO_ENDPOINTS = cnp("web-empty-endpoints", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEndpoints: []
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
WEB_EMPTY_TO_CIDR = cnp("web-empty-cidr", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toCIDR: []
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
""")
WEB_EMPTY_TO_ENTITIES = cnp("web-empty-entities", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toEntities: []
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
""")
WEB_EMPTY_TO_CIDRSET = cnp("web-empty-cidrset", """
endpointSelector: {matchLabels: {app: web}}
egress:
  - toCIDRSet: []
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
""")
DB_EMPTY_L3 = cnp("db-empty-l3", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: []
""")
DB_EMPTY_BESIDE_ALLOW = cnp("db-empty-beside-allow", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: []
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
DB_EMPTY_DENY = cnp("db-empty-deny", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{}]
ingressDeny:
  - fromEndpoints: []
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
DB_EMPTY_WITH_HOST = cnp("db-empty-with-host", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: []
    fromEntities: [host]
""")

# issue 12: namespace and io.kubernetes.pod.namespace are one key
DB_K8S_NAMESPACE_SUBJECT = ccnp("db-prod-from-web", """
endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: prod, app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""")
DB_FROM_K8S_NAMESPACE_DEV = ccnp("db-from-dev", """
endpointSelector: {matchLabels: {app: db}}
ingress:
  - fromEndpoints: [{matchLabels: {io.kubernetes.pod.namespace: dev}}]
""")


CASES = [
    # L3/L4 basics
    Case("no-policy-allows", "", "app=web", "app=db", "5432/tcp", "allow",
         "no policy selects either workload: both directions are open"),
    Case("l4-allow", DB_FROM_WEB_5432, "app=web", "app=db", "5432/tcp", "allow",
         "db ingress allows web on 5432/TCP; web has no policy"),
    Case("l4-wrong-port", DB_FROM_WEB_5432, "app=web", "app=db", "5433/tcp", "deny",
         "db ingress is default-deny and only 5432 is allowed"),
    Case("l4-wrong-proto", DB_FROM_WEB_5432, "app=web", "app=db", "5432/udp", "deny",
         "the port rule is TCP only"),
    Case("l3-wrong-peer", DB_FROM_WEB_5432, "app=api", "app=db", "5432/tcp", "deny",
         "api is not selected by fromEndpoints app=web"),
    Case("ingress-rules-leave-egress-open", DB_FROM_WEB_5432, "app=db", "app=web", "80/tcp", "allow",
         "the policy has only ingress rules: db egress stays open, web has no policy"),
    Case("l3-only-all-ports", DB_FROM_WEB_L3, "app=web", "app=db", "9999/udp", "allow",
         "no toPorts: every protocol and port"),
    Case("l3-only-icmp", DB_FROM_WEB_L3, "app=web", "app=db", "8/icmp", "allow",
         "no toPorts: ICMP included"),
    Case("empty-element-denies-all", DB_EMPTY_ELEMENT, "app=web", "app=db", "80/tcp", "deny",
         "an element with no peers and no ports selects nothing but makes ingress default-deny"),
    Case("policies-union", DB_UNION, "app=api", "app=db", "9/udp", "allow",
         "allows of several policies add up: db-api-any allows api on everything"),
    Case("policies-union-no-leak", DB_UNION, "app=web", "app=db", "9/udp", "deny",
         "web is allowed 80/TCP only; api's allow does not extend to web"),
    # port ranges and protocols
    Case("range-low-edge", DB_RANGE, "app=web", "app=db", "8000/tcp", "allow", "8000..8100 includes 8000"),
    Case("range-inside", DB_RANGE, "app=web", "app=db", "8057/tcp", "allow", "8000..8100 includes 8057"),
    Case("range-high-edge", DB_RANGE, "app=web", "app=db", "8100/tcp", "allow", "endPort is inclusive"),
    Case("range-below", DB_RANGE, "app=web", "app=db", "7999/tcp", "deny", "7999 is below the range"),
    Case("range-above", DB_RANGE, "app=web", "app=db", "8101/tcp", "deny", "8101 is above the range"),
    Case("range-other-proto", DB_RANGE, "app=web", "app=db", "8050/udp", "deny", "the range is TCP only"),
    Case("any-proto-tcp", DB_ANY_53, "app=web", "app=db", "53/tcp", "allow",
         "no protocol means ANY: TCP included"),
    Case("any-proto-udp", DB_ANY_53, "app=web", "app=db", "53/udp", "allow",
         "no protocol means ANY: UDP included"),
    Case("any-proto-other-port", DB_ANY_53, "app=web", "app=db", "54/udp", "deny", "only port 53"),
    Case("any-port-not-icmp", DB_ALL_PORTS_ANY, "app=web", "app=db", "8/icmp", "deny",
         "port 0 protocol ANY is every TCP/UDP/SCTP port, never ICMP"),
    Case("any-port-any-tcp", DB_ALL_PORTS_ANY, "app=web", "app=db", "31337/tcp", "allow",
         "port 0 is every port"),
    Case("l4-only-any-peer-world", DB_ANY_53, "entity:world", "app=db", "53/udp", "allow",
         "toPorts without a peer field selects every peer, world included"),
    Case("l4-only-any-peer-host", DB_ANY_53, "entity:host", "app=db", "53/tcp", "allow",
         "toPorts without a peer field selects every peer, the host included"),
    Case("icmp-allowed-type", DB_PING_ONLY, "app=web", "app=db", "8/icmp", "allow",
         "icmps EchoRequest is type 8"),
    Case("icmp-rule-not-tcp", DB_PING_ONLY, "app=web", "app=db", "80/tcp", "deny",
         "an icmps-only element allows no TCP"),
    # matchExpressions
    Case("in-first-value", DB_EXPR_IN, "app=web", "app=db", "80/tcp", "allow", "web is In [web, api]"),
    Case("in-second-value", DB_EXPR_IN, "app=api", "app=db", "80/tcp", "allow", "api is In [web, api]"),
    Case("in-miss", DB_EXPR_IN, "app=cache", "app=db", "80/tcp", "deny", "cache is not In [web, api]"),
    Case("notin-other", DB_EXPR_NOTIN, "app=api", "app=db", "80/tcp", "allow", "api is NotIn [web]"),
    Case("notin-excluded", DB_EXPR_NOTIN, "app=web", "app=db", "80/tcp", "deny", "web is excluded"),
    Case("notin-not-world", DB_EXPR_NOTIN, "entity:world", "app=db", "80/tcp", "deny",
         "a selector naming no reserved: key never selects world (Stockade)"),
    Case("notin-not-host", DB_EXPR_NOTIN, "entity:host", "app=db", "80/tcp", "deny",
         "a selector naming no reserved: key never selects the host (Stockade)"),
    Case("exists-present", DB_EXPR_EXISTS, "app=web,env=prod", "app=db", "80/tcp", "allow",
         "the source has an env label"),
    Case("exists-absent", DB_EXPR_EXISTS, "app=web", "app=db", "80/tcp", "deny",
         "the source has no env label"),
    Case("doesnotexist-absent", DB_EXPR_DNE, "app=web", "app=db", "80/tcp", "allow",
         "the source has no env label"),
    Case("doesnotexist-present", DB_EXPR_DNE, "app=web,env=prod", "app=db", "80/tcp", "deny",
         "the source has an env label"),
    Case("labels-and-expressions", DB_EXPR_COMBO, "app=web,env=prod", "app=db", "80/tcp", "allow",
         "app=web holds and env prod is NotIn [dev]"),
    Case("labels-and-expressions-fail", DB_EXPR_COMBO, "app=web,env=dev", "app=db", "80/tcp", "deny",
         "env dev is In [dev]: the expression fails"),
    Case("labels-and-expressions-unlabelled", DB_EXPR_COMBO, "app=web", "app=db", "80/tcp", "allow",
         "NotIn holds when the key is absent"),
    # deny rules
    Case("deny-port", DB_DENY_WEB_5432, "app=web", "app=db", "5432/tcp", "deny",
         "deny beats the allow from every workload"),
    Case("deny-other-port", DB_DENY_WEB_5432, "app=web", "app=db", "80/tcp", "allow",
         "the deny covers 5432 only; the L3 allow covers 80"),
    Case("deny-other-peer", DB_DENY_WEB_5432, "app=api", "app=db", "5432/tcp", "allow",
         "the deny names web only"),
    Case("broad-deny-beats-narrow-allow", DB_BROAD_DENY, "app=web", "app=db", "80/tcp", "deny",
         "an L3 deny covers the 80/TCP allow"),
    Case("deny-only-default-deny", DB_DENY_ONLY, "app=api", "app=db", "80/tcp", "deny",
         "ingressDeny rules make ingress default-deny too"),
    Case("deny-only-denied", DB_DENY_ONLY, "app=web", "app=db", "80/tcp", "deny", "web is denied"),
    Case("deny-only-opt-out", DB_DENY_ONLY_OPT_OUT, "app=api", "app=db", "80/tcp", "allow",
         "enableDefaultDeny.ingress false: what is not denied is allowed"),
    Case("deny-only-opt-out-still-denies", DB_DENY_ONLY_OPT_OUT, "app=web", "app=db", "80/tcp", "deny",
         "opting out of default deny keeps the deny rules"),
    Case("egress-deny-other-policy", DB_FROM_WEB_L3 + WEB_EGRESS_DENY_5432, "app=web", "app=db",
         "5432/tcp", "deny", "web's egress deny wins over db's ingress allow"),
    Case("egress-deny-makes-egress-default-deny", DB_FROM_WEB_L3 + WEB_EGRESS_DENY_5432, "app=web",
         "app=db", "80/tcp", "deny",
         "egressDeny rules make web's egress default-deny and nothing allows 80"),
    Case("egress-deny-opt-out", DB_FROM_WEB_L3 + WEB_EGRESS_DENY_5432_OPT_OUT, "app=web", "app=db",
         "80/tcp", "allow", "with enableDefaultDeny.egress false only 5432 is denied"),
    Case("egress-deny-opt-out-still-denies", DB_FROM_WEB_L3 + WEB_EGRESS_DENY_5432_OPT_OUT, "app=web",
         "app=db", "5432/tcp", "deny", "the deny itself stays"),
    Case("deny-ping-any-peer", DB_DENY_PING, "app=web", "app=db", "8/icmp", "deny",
         "an icmps-only deny applies to every peer"),
    Case("deny-ping-leaves-tcp", DB_DENY_PING, "app=web", "app=db", "80/tcp", "allow",
         "the deny covers ICMP echo only"),
    Case("opt-out-then-strict", DB_OPT_OUT_AND_STRICT, "app=cache", "app=db", "80/tcp", "deny",
         "one policy with rules wants default deny: ingress is default-deny"),
    Case("opt-out-then-strict-web", DB_OPT_OUT_AND_STRICT, "app=web", "app=db", "9/udp", "allow",
         "web is still allowed everything by the opted-out policy"),
    Case("opt-out-alone", DB_OPT_OUT_ONLY, "app=cache", "app=db", "443/tcp", "allow",
         "every policy with ingress rules opted out: unmatched traffic is allowed"),
    # egress-only policies
    Case("egress-allow", WEB_EGRESS_DB_5432, "app=web", "app=db", "5432/tcp", "allow",
         "web egress allows db on 5432/TCP; db has no policy"),
    Case("egress-default-deny", WEB_EGRESS_DB_5432, "app=web", "app=api", "80/tcp", "deny",
         "web egress is default-deny"),
    Case("egress-wrong-port", WEB_EGRESS_DB_5432, "app=web", "app=db", "80/tcp", "deny",
         "only 5432 is allowed"),
    Case("egress-leaves-ingress-open", WEB_EGRESS_DB_5432, "app=api", "app=web", "80/tcp", "allow",
         "an egress-only policy leaves web's ingress open"),
    Case("egress-to-world-denied", WEB_EGRESS_DB_5432, "app=web", "entity:world", "443/tcp", "deny",
         "world is not db"),
    # entities
    Case("to-world", WEB_EGRESS_WORLD, "app=web", "entity:world", "443/tcp", "allow",
         "toEntities world"),
    Case("to-world-address", WEB_EGRESS_WORLD, "app=web", "cidr:192.0.2.10", "443/tcp", "allow",
         "an address no policy names is world"),
    Case("to-world-not-workload", WEB_EGRESS_WORLD, "app=web", "app=db", "5432/tcp", "deny",
         "a workload is not world"),
    Case("to-world-not-host", WEB_EGRESS_WORLD, "app=web", "entity:host", "22/tcp", "deny",
         "the host is not world"),
    Case("to-host", WEB_EGRESS_HOST, "app=web", "entity:host", "22/tcp", "allow", "toEntities host"),
    Case("to-host-not-world", WEB_EGRESS_HOST, "app=web", "entity:world", "22/tcp", "deny",
         "world is not the host"),
    Case("from-host", DB_FROM_HOST, "entity:host", "app=db", "5432/tcp", "allow", "fromEntities host"),
    Case("from-host-not-world", DB_FROM_HOST, "entity:world", "app=db", "5432/tcp", "deny",
         "world is not the host"),
    Case("from-host-not-workload", DB_FROM_HOST, "app=web", "app=db", "5432/tcp", "deny",
         "a workload is not the host"),
    Case("cluster-workload", DB_FROM_CLUSTER, "app=web", "app=db", "80/tcp", "allow",
         "cluster includes every workload"),
    Case("cluster-host", DB_FROM_CLUSTER, "entity:host", "app=db", "80/tcp", "allow",
         "cluster includes the host"),
    Case("cluster-not-world", DB_FROM_CLUSTER, "entity:world", "app=db", "80/tcp", "deny",
         "cluster excludes world"),
    Case("cluster-not-cidr", DB_FROM_CLUSTER, "cidr:192.0.2.10", "app=db", "80/tcp", "deny",
         "an outside address is world, not cluster"),
    Case("all-world", DB_FROM_ALL_80, "entity:world", "app=db", "80/tcp", "allow", "all includes world"),
    Case("all-host", DB_FROM_ALL_80, "entity:host", "app=db", "80/tcp", "allow", "all includes the host"),
    Case("all-port-still-applies", DB_FROM_ALL_80, "entity:world", "app=db", "81/tcp", "deny",
         "all is the peer; the port rule still applies"),
    Case("empty-selector-workload", DB_FROM_ANY_WORKLOAD, "app=web", "app=db", "80/tcp", "allow",
         "{} selects every workload"),
    Case("empty-selector-not-world", DB_FROM_ANY_WORKLOAD, "entity:world", "app=db", "80/tcp", "deny",
         "{} never selects world"),
    Case("empty-selector-not-host", DB_FROM_ANY_WORKLOAD, "entity:host", "app=db", "80/tcp", "deny",
         "{} never selects the host"),
    Case("empty-selector-not-cidr", DB_FROM_ANY_WORKLOAD, "cidr:10.9.8.7", "app=db", "80/tcp", "deny",
         "{} never selects an outside address"),
    # CIDR peers
    Case("cidr-inside", WEB_EGRESS_CIDR_EXCEPT, "app=web", "cidr:10.2.3.4", "80/tcp", "allow",
         "10.2.3.4 is in 10.0.0.0/8 and not in the except"),
    Case("cidr-except", WEB_EGRESS_CIDR_EXCEPT, "app=web", "cidr:10.1.2.3", "80/tcp", "deny",
         "10.1.2.3 is in the except 10.1.0.0/16"),
    Case("cidr-outside", WEB_EGRESS_CIDR_EXCEPT, "app=web", "cidr:192.0.2.10", "80/tcp", "deny",
         "192.0.2.10 is outside 10.0.0.0/8"),
    Case("cidr-not-workload", WEB_EGRESS_CIDR_EXCEPT, "app=web", "app=db", "80/tcp", "deny",
         "a CIDR never selects a workload of the fleet"),
    Case("from-cidr", DB_FROM_TESTNET_5432, "cidr:192.0.2.10", "app=db", "5432/tcp", "allow",
         "192.0.2.10 is in 192.0.2.0/24"),
    Case("from-cidr-wrong-port", DB_FROM_TESTNET_5432, "cidr:192.0.2.10", "app=db", "80/tcp", "deny",
         "only 5432 is allowed"),
    Case("from-cidr-outside", DB_FROM_TESTNET_5432, "cidr:198.51.100.7", "app=db", "5432/tcp", "deny",
         "198.51.100.7 is outside 192.0.2.0/24"),
    Case("from-cidr-not-workload", DB_FROM_TESTNET_5432, "app=web", "app=db", "5432/tcp", "deny",
         "a CIDR never selects a workload of the fleet"),
    Case("cidr-zero-world", WEB_EGRESS_CIDR_ZERO, "app=web", "entity:world", "443/tcp", "allow",
         "0.0.0.0/0 is every outside address"),
    Case("cidr-zero-address", WEB_EGRESS_CIDR_ZERO, "app=web", "cidr:192.0.2.10", "443/tcp", "allow",
         "192.0.2.10 is in 0.0.0.0/0"),
    Case("cidr-zero-not-workload", WEB_EGRESS_CIDR_ZERO, "app=web", "app=db", "443/tcp", "deny",
         "0.0.0.0/0 does not select workloads"),
    Case("cidr-deny-inside-world", WEB_EGRESS_WORLD_BUT_TESTNET, "app=web", "cidr:192.0.2.10", "443/tcp",
         "deny", "the CIDR deny beats the world allow"),
    Case("cidr-deny-rest-of-world", WEB_EGRESS_WORLD_BUT_TESTNET, "app=web", "cidr:198.51.100.7",
         "443/tcp", "allow", "outside the denied CIDR, world is allowed"),
    Case("cidrset-except-low-half", DB_FROM_TESTNET_LOW_HALF, "cidr:192.0.2.10", "app=db", "80/tcp",
         "allow", "192.0.2.10 is outside the except 192.0.2.128/25"),
    Case("cidrset-except-high-half", DB_FROM_TESTNET_LOW_HALF, "cidr:192.0.2.200", "app=db", "80/tcp",
         "deny", "192.0.2.200 is in the except 192.0.2.128/25"),
    # namespaced and cluster-wide policies
    Case("namespace-same", DB_FROM_WEB_NS_PROD, "app=web,namespace=prod", "app=db,namespace=prod",
         "5432/tcp", "allow", "a prod policy's peers are prod workloads"),
    Case("namespace-other-source", DB_FROM_WEB_NS_PROD, "app=web,namespace=dev", "app=db,namespace=prod",
         "5432/tcp", "deny", "the implicit namespace=prod excludes the dev web"),
    Case("namespace-unselected-destination", DB_FROM_WEB_NS_PROD, "app=web,namespace=dev",
         "app=db,namespace=dev", "5432/tcp", "allow", "a prod policy does not select the dev db"),
    Case("clusterwide-crosses-namespaces", DB_FROM_WEB_CLUSTERWIDE, "app=web,namespace=dev",
         "app=db,namespace=prod", "5432/tcp", "allow", "a CCNP gains no namespace"),
    Case("clusterwide-selects-every-namespace", DB_FROM_WEB_CLUSTERWIDE, "app=api,namespace=dev",
         "app=db,namespace=dev", "5432/tcp", "deny", "the CCNP selects the dev db too"),
    Case("namespace-named-peer", DB_FROM_DEV_WEB_NS_PROD, "app=web,namespace=dev", "app=db,namespace=prod",
         "80/tcp", "allow", "a peer selector naming namespace keeps it"),
    Case("namespace-named-peer-excludes-own", DB_FROM_DEV_WEB_NS_PROD, "app=web,namespace=prod",
         "app=db,namespace=prod", "80/tcp", "deny", "the peer must be in dev"),
    # issue 12: explicitly empty peer lists
    Case("empty-fromEndpoints-with-ports", DB_EMPTY_FROM_ENDPOINTS, "app=web", "app=db", "5432/tcp", "deny",
         "issue 12: fromEndpoints [] selects no peer, even with toPorts; ingress is default-deny"),
    Case("empty-fromEntities-with-ports", DB_EMPTY_FROM_ENTITIES, "entity:world", "app=db", "80/tcp", "deny",
         "issue 12: fromEntities [] selects no peer"),
    Case("empty-fromCIDR-with-ports", DB_EMPTY_FROM_CIDR, "cidr:192.0.2.10", "app=db", "80/tcp", "deny",
         "issue 12: fromCIDR [] selects no peer"),
    Case("empty-fromCIDRSet-with-ports", DB_EMPTY_FROM_CIDRSET, "app=web", "app=db", "80/tcp", "deny",
         "issue 12: fromCIDRSet [] selects no peer"),
    Case("empty-toEndpoints-with-ports", WEB_EMPTY_TO_ENDPOINTS, "app=web", "app=db", "5432/tcp", "deny",
         "issue 12: toEndpoints [] selects no peer; web egress is default-deny"),
    Case("empty-toCIDR-with-ports", WEB_EMPTY_TO_CIDR, "app=web", "entity:world", "443/tcp", "deny",
         "issue 12: toCIDR [] selects no peer"),
    Case("empty-toEntities-with-ports", WEB_EMPTY_TO_ENTITIES, "app=web", "entity:host", "443/tcp", "deny",
         "issue 12: toEntities [] selects no peer"),
    Case("empty-toCIDRSet-with-ports", WEB_EMPTY_TO_CIDRSET, "app=web", "cidr:192.0.2.10", "443/tcp", "deny",
         "issue 12: toCIDRSet [] selects no peer"),
    Case("empty-list-l3-default-deny", DB_EMPTY_L3, "app=web", "app=db", "80/tcp", "deny",
         "fromEndpoints [] without ports selects nothing but keeps ingress default-deny"),
    Case("empty-list-beside-allow", DB_EMPTY_BESIDE_ALLOW, "app=web", "app=db", "80/tcp", "allow",
         "the other element allows web on 80"),
    Case("empty-list-beside-allow-port", DB_EMPTY_BESIDE_ALLOW, "app=web", "app=db", "5432/tcp", "deny",
         "issue 12: the empty element does not open 5432 to every peer"),
    Case("empty-list-deny-selects-nothing", DB_EMPTY_DENY, "app=web", "app=db", "5432/tcp", "allow",
         "issue 12: a deny element with fromEndpoints [] denies no peer"),
    Case("empty-list-voids-element", DB_EMPTY_WITH_HOST, "entity:host", "app=db", "80/tcp", "deny",
         "issue 12: an explicitly empty peer list voids the whole element, fromEntities included"),
    # issue 12: namespace keys
    Case("k8s-namespace-key-selects-subject", DB_K8S_NAMESPACE_SUBJECT, "app=api,namespace=prod",
         "app=db,namespace=prod", "5432/tcp", "deny",
         "issue 12: k8s:io.kubernetes.pod.namespace=prod selects a workload labelled namespace=prod"),
    Case("k8s-namespace-key-subject-allows", DB_K8S_NAMESPACE_SUBJECT, "app=web,namespace=prod",
         "app=db,namespace=prod", "5432/tcp", "allow", "web is allowed on 5432"),
    Case("k8s-namespace-key-selects-peer", DB_FROM_K8S_NAMESPACE_DEV, "app=web,namespace=dev", "app=db",
         "80/tcp", "allow", "issue 12: io.kubernetes.pod.namespace=dev selects a namespace=dev workload"),
    Case("k8s-namespace-key-peer-other-ns", DB_FROM_K8S_NAMESPACE_DEV, "app=web,namespace=prod", "app=db",
         "80/tcp", "deny", "the prod web is not in dev"),
    Case("implicit-namespace-matches-k8s-label", DB_FROM_WEB_NS_PROD,
         "app=api,io.kubernetes.pod.namespace=prod", "app=db,io.kubernetes.pod.namespace=prod",
         "5432/tcp", "deny",
         "issue 12: a prod policy selects a db labelled io.kubernetes.pod.namespace=prod; api is not web"),
    Case("implicit-namespace-peer-k8s-label", DB_FROM_WEB_NS_PROD,
         "app=web,io.kubernetes.pod.namespace=prod", "app=db,namespace=prod", "5432/tcp", "allow",
         "issue 12: the implicit namespace=prod on the peer matches io.kubernetes.pod.namespace=prod"),
]
