"""Inventory services: definition parsing, the membership rule, and selector lint."""
import pytest

from stockade.daemon.inventory import effective_labels, membership, parse_services
from stockade.errors import InvalidRequest
from stockade.policy.api.loader import load_text
from stockade.policy.labels import LabelSet
from stockade.policy.lint import service_label_sets, unmatched_selectors, workload_label_sets

DEFS = {
    "web": {"labels": {"tier": "front"}, "members": [{"container_name": "web-*"}, {"image": "*/nginx:*"}]},
    "db": {"members": [{"container_labels": {"matchLabels": {"role": "db"}}}, {"endpoint": "pg-ns"}]},
    "vm": {"members": [{"interface": "tap-vm*"}, {"libvirt_domain": "erp-*"}]},
    "backup": {"labels": {"tier": "storage"}, "cidrs": ["192.0.2.0/24"]},
    "alpha": {"members": [{"container_name": "web-1"}]},
}


def w(name, source="podman", image=None, labels=None, interface="veth0"):
    return {"name": name, "source": source, "image": image, "interface": interface,
            "labels": LabelSet.from_mapping(labels or {}, "container")}


@pytest.mark.parametrize("workload,service", [
    (w("web-7"), "web"),
    (w("x", image="docker.io/nginx:1.25"), "web"),
    (w("y", labels={"role": "db"}), "db"),
    (w("pg-ns", source="static"), "db"),
    (w("pg-ns"), None),                         # a container named like a static endpoint
    (w("v", source="static", interface="tap-vm3"), "vm"),
    (w("erp-1", source="libvirt"), "vm"),
    (w("erp-1"), None),
    (w("web-1"), "alpha"),                      # conflict: alpha < web by name
    (w("other"), None),
], ids=["name", "image", "container-labels", "static-name", "static-name-wrong-source",
        "interface", "libvirt-domain", "domain-glob-not-container", "conflict", "none"])
def test_membership(workload, service):
    services = parse_services(DEFS)
    svc, matched = membership(services, workload)
    assert (svc.name if svc else None) == service
    if workload["name"] == "web-1":
        assert matched == ["alpha", "web"]


def test_effective_labels_merge_and_add_service_label():
    svc = parse_services(DEFS)["web"]
    own = LabelSet.from_mapping({"app": "x"}, "container")
    assert set(effective_labels(own, svc).to_strings()) == {
        "container:app=x", "service:service=web", "service:tier=front"}


@pytest.mark.parametrize("defs,field,msg", [
    ({"Bad": {"cidrs": ["10.0.0.0/8"]}}, "services.Bad", "lower-case"),
    ({"a": {"members": [{"nope": "x"}]}}, "services.a.members[0]", "exactly one of"),
    ({"a": {"members": [{"image": ""}]}}, "services.a.members[0].image", "name or glob"),
    ({"a": {"cidrs": ["10.0.0.1/8"]}}, "services.a.cidrs[0]", "not a CIDR"),
    ({"a": {}}, "services.a", "needs members or cidrs"),
    ({"a": {"members": [{"container_name": "x"}], "colour": 1}}, "services.a.colour", "unknown field"),
    ({"a": {"labels": {"bad key": "v"}, "cidrs": ["10.0.0.0/8"]}}, "services.a.labels.bad key", "not a valid"),
    ({"a": {"members": [{"container_labels": {"matchExpressions": [{"key": "k", "operator": "Nope"}]}}]}},
     "services.a.members[0].container_labels.matchExpressions[0].operator", "not one of"),
], ids=["name", "matcher", "empty-glob", "cidr", "empty", "unknown", "label", "selector"])
def test_bad_definitions_name_the_field(defs, field, msg):
    with pytest.raises(InvalidRequest) as err:
        parse_services(defs)
    assert err.value.field == field and msg in str(err.value)


POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: x}
spec:
  endpointSelector: {matchLabels: {service: web}}
  egress:
  - toEndpoints: [{matchLabels: {app: ghost}}, {matchLabels: {service: backup}}]
  - toCIDRSet: [{cidrGroupRef: backup}, {cidrGroupRef: nowhere}]
"""


def test_lint_warns_about_selectors_matching_nothing():
    sets = service_label_sets(DEFS) + workload_label_sets([{"labels": {"app": "seen"}}])
    warnings = unmatched_selectors(load_text(POLICY, "p.yaml"), sets, set(DEFS))
    assert len(warnings) == 2
    assert "policy x selects nothing on any host: spec.egress[0].toEndpoints[0] {app=ghost}" in warnings[0]
    assert "cidrGroupRef nowhere" in warnings[1]
