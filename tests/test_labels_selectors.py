"""Labels (``source:key=value``), EndpointSelector matching and command-line SEL/PORT parsing."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.errors import SelectorError
from stockade.policy.api.selector import EndpointSelector, Requirement
from stockade.policy.labels import Label, LabelSet, check_key, check_value, split_source
from stockade.policy.sel import PeerSpec, parse_port, parse_sel

pytestmark = pytest.mark.pure


# labels -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, source, expected", [
    ("", "unspec", ""),
    ("app=web", "unspec", "unspec:app=web"),
    ("k=v,container:k2=v2", "unspec", "container:k2=v2,unspec:k=v"),
    (" app = web , tier=db ", "unspec", "unspec:app=web,unspec:tier=db"),
    ("flag", "unspec", "unspec:flag"),
    ("empty=", "static", "static:empty"),
    ("app=web", "container", "container:app=web"),
    ("libvirt:vm=a,app=web", "container", "container:app=web,libvirt:vm=a"),
    ("app=a,app=b", "unspec", "unspec:app=b"),
    ("c=1=2", "unspec", "unspec:c=1=2"),
    ("a=1,,b=2,", "unspec", "unspec:a=1,unspec:b=2"),
    ("example.com/app=x", "unspec", "unspec:example.com/app=x"),
], ids=["empty", "one", "mixed-sources-sorted", "whitespace", "no-value", "empty-value",
        "default-source", "explicit-source-wins", "last-duplicate-wins", "value-with-equals",
        "empty-parts-skipped", "prefixed-key"])
def test_labelset_parse(text, source, expected):
    labels = LabelSet.parse(text, source)
    assert str(labels) == expected
    assert LabelSet.parse(text, source) == labels


@pytest.mark.parametrize("mapping, source, expected", [
    ({}, "unspec", []),
    ({"app": "web"}, "unspec", [Label("unspec", "app", "web")]),
    ({"app": None}, "container", [Label("container", "app", "")]),
    ({"port": 80}, "static", [Label("static", "port", "80")]),
    ({"b": "1", "libvirt:a": "2"}, "unspec", [Label("libvirt", "a", "2"), Label("unspec", "b", "1")]),
    ({"any:app": "x"}, "unspec", [Label("any", "app", "x")]),
], ids=["empty", "default-source", "none-is-empty", "int-value", "sorted-by-source", "any-prefix-kept"])
def test_labelset_from_mapping(mapping, source, expected):
    labels = LabelSet.from_mapping(mapping, source)
    assert list(labels) == expected
    assert labels.to_dict() == {f"{l.source}:{l.key}": l.value for l in expected}


def test_labelset_is_sorted_deduplicated_and_hashable():
    a = LabelSet([Label("unspec", "b", "1"), Label("container", "a", "2"), Label("unspec", "b", "1")])
    assert list(a) == [Label("container", "a", "2"), Label("unspec", "b", "1")]
    assert a == LabelSet(reversed(list(a)))
    assert hash(a) == hash(LabelSet(list(a)))
    assert a.merged([Label("static", "c", "")]).to_strings() == ["container:a=2", "static:c", "unspec:b=1"]


@pytest.mark.parametrize("source, key, values, has", [
    ("any", "app", ["c", "u"], True),
    ("container", "app", ["c"], True),
    ("unspec", "app", ["u"], True),
    ("libvirt", "app", [], False),
    ("any", "missing", [], False),
], ids=["any-sees-all-sources", "container-only", "unspec-only", "other-source", "missing"])
def test_values_of_and_has(source, key, values, has):
    labels = LabelSet.parse("container:app=c,app=u")
    assert sorted(labels.values_of(source, key)) == values
    assert labels.has(source, key) is has


@pytest.mark.parametrize("key, default, expected", [
    ("app", "any", ("any", "app")),
    ("app", "unspec", ("unspec", "app")),
    ("container:app", "any", ("container", "app")),
    ("any:app", "unspec", ("any", "app")),
    ("a:b:c", "any", ("a", "b:c")),
    ("reserved:host", "any", ("reserved", "host")),
    ("example.com/app", "any", ("any", "example.com/app")),
], ids=["bare", "bare-other-default", "container", "any", "only-first-colon", "reserved", "prefixed-key"])
def test_split_source(key, default, expected):
    assert split_source(key, default) == expected


@pytest.mark.parametrize("key, error", [
    ("app", None),
    ("container:app", None),
    ("any:app.kubernetes.io", None),
    ("example.com/app", None),
    ("k8s:io.kubernetes.pod.namespace", None),
    ("a" * 63, None),
    ("a" * 64, "is not a valid label key"),
    ("A_b-9", None),
    ("-app", "'-app' is not a valid label key"),
    ("app-", "is not a valid label key"),
    ("app name", "is not a valid label key"),
    ("", "is not a valid label key"),
    ("Example.com/app", "is not a valid label key"),
    ("container:a:b", "'container:a:b' is not a valid label key"),
    ("bogus:app", "unknown label source 'bogus' (one of any, cidr, container"),
    (":app", "unknown label source ''"),
    ("cidr:10.0.0.0/8", None),
], ids=["bare", "container", "any-dots", "dns-prefix", "k8s", "63-chars", "64-chars", "mixed-case-name",
        "leading-dash", "trailing-dash", "space", "empty", "upper-prefix", "two-colons",
        "unknown-source", "empty-source", "cidr-source-unchecked"])
def test_check_key(key, error):
    got = check_key(key)
    if error is None:
        assert got is None
    else:
        assert got is not None and error in got


@pytest.mark.parametrize("value, source, error", [
    ("", "any", None),
    ("web", "any", None),
    ("v1.2_3-x", "any", None),
    ("a" * 63, "any", None),
    ("a" * 64, "any", "is not a valid label value"),
    ("web server", "any", "'web server' is not a valid label value"),
    ("-web", "any", "is not a valid label value"),
    ("10.0.0.0/8", "any", "is not a valid label value"),
    ("10.0.0.0/8", "cidr", None),
    ("2001:db8::/32", "cidr", None),
    ("not/cidr", "cidr", "is not a valid label value"),
    (3, "any", "label value must be a string, not int"),
], ids=["empty", "word", "punctuation", "63-chars", "64-chars", "space", "leading-dash",
        "cidr-outside-cidr-source", "cidr-v4", "cidr-v6", "cidr-source-bad", "not-a-string"])
def test_check_value(value, source, error):
    got = check_value(value, source)
    if error is None:
        assert got is None
    else:
        assert got is not None and error in got


# selectors ----------------------------------------------------------------------------

@pytest.mark.parametrize("match_labels, exprs, reqs, text", [
    ({}, [], (), "{}"),
    ({"app": "web"}, [], (Requirement("any", "app", "In", ("web",)),), "{app=web}"),
    ({"container:app": "web"}, [], (Requirement("container", "app", "In", ("web",)),), "{container:app=web}"),
    ({"any:app": "web"}, [], (Requirement("any", "app", "In", ("web",)),), "{app=web}"),
    ({}, [("env", "In", ["b", "a", "b"])], (Requirement("any", "env", "In", ("a", "b")),), "{env in (a,b)}"),
    ({}, [("env", "NotIn", ["x"])], (Requirement("any", "env", "NotIn", ("x",)),), "{env notin (x)}"),
    ({}, [("libvirt:vm", "Exists", [])], (Requirement("libvirt", "vm", "Exists"),), "{libvirt:vm}"),
    ({}, [("vm", "DoesNotExist", [])], (Requirement("any", "vm", "DoesNotExist"),), "{!vm}"),
    ({"app": "web"}, [("app", "In", ["web"])], (Requirement("any", "app", "In", ("web",)),), "{app=web}"),
    ({"b": "1", "a": "2"}, [], (Requirement("any", "a", "In", ("2",)), Requirement("any", "b", "In", ("1",))),
     "{a=2, b=1}"),
], ids=["empty", "match-label", "container-prefix", "any-prefix-is-bare", "in-sorted-deduplicated",
        "notin", "exists-with-source", "does-not-exist", "duplicate-requirement-merged", "sorted"])
def test_selector_build(match_labels, exprs, reqs, text):
    sel = EndpointSelector.build(match_labels, exprs)
    assert sel.requirements == reqs
    assert str(sel) == text


def test_selector_helpers():
    sel = EndpointSelector.from_match_labels({"app": "web"})
    assert sel == EndpointSelector.build({"app": "web"}, [])
    assert not sel.names_reserved and sel.names_key("app") and not sel.names_key("namespace")
    ns = sel.with_requirement(Requirement("any", "namespace", "In", ("prod",)))
    assert str(ns) == "{app=web, namespace=prod}" and ns.names_key("namespace")
    assert ns.with_requirement(Requirement("any", "namespace", "In", ("prod",))) == ns
    assert EndpointSelector.build({}, [("reserved:host", "Exists", [])]).names_reserved


LABELS = "container:app=web,libvirt:vm=db1,static:role=backup,tier=front"


@pytest.mark.parametrize("match_labels, exprs, matches", [
    ({}, [], True),
    ({"app": "web"}, [], True),
    ({"any:app": "web"}, [], True),
    ({"container:app": "web"}, [], True),
    ({"libvirt:app": "web"}, [], False),
    ({"unspec:tier": "front"}, [], True),
    ({"container:tier": "front"}, [], False),
    ({"app": "db"}, [], False),
    ({"app": "web", "tier": "front"}, [], True),
    ({"app": "web", "tier": "back"}, [], False),
    ({}, [("app", "In", ["db", "web"])], True),
    ({}, [("container:app", "In", ["web"])], True),
    ({}, [("static:app", "In", ["web"])], False),
    ({}, [("missing", "In", ["x"])], False),
    ({}, [("app", "NotIn", ["web"])], False),
    ({}, [("app", "NotIn", ["db"])], True),
    ({}, [("libvirt:app", "NotIn", ["web"])], True),
    ({}, [("missing", "NotIn", ["x"])], True),
    ({}, [("vm", "Exists", [])], True),
    ({}, [("libvirt:vm", "Exists", [])], True),
    ({}, [("container:vm", "Exists", [])], False),
    ({}, [("missing", "Exists", [])], False),
    ({}, [("missing", "DoesNotExist", [])], True),
    ({}, [("vm", "DoesNotExist", [])], False),
    ({}, [("container:vm", "DoesNotExist", [])], True),
    ({"app": "web"}, [("role", "Exists", []), ("vm", "NotIn", ["db2"])], True),
    ({"app": "web"}, [("role", "DoesNotExist", [])], False),
], ids=["empty-selects-all", "bare-key", "any-prefix", "same-source", "other-source", "unspec-source",
        "unspec-label-not-container", "wrong-value", "all-labels", "one-label-wrong",
        "in", "in-same-source", "in-other-source", "in-missing-key", "notin-excluded", "notin-other-value",
        "notin-other-source", "notin-missing-key-matches", "exists", "exists-same-source",
        "exists-other-source", "exists-missing", "dne-missing", "dne-present", "dne-other-source",
        "combined", "combined-one-fails"])
def test_selector_matches(match_labels, exprs, matches):
    assert EndpointSelector.build(match_labels, exprs).matches(LabelSet.parse(LABELS)) is matches


def test_empty_selector_matches_empty_labels():
    assert EndpointSelector().matches(LabelSet())
    assert EndpointSelector.build({}, [("app", "NotIn", ["x"])]).matches(LabelSet())
    assert not EndpointSelector.build({}, [("app", "Exists", [])]).matches(LabelSet())


# property: matches agrees with a reference evaluation ----------------------------------

LABEL_SOURCES = ["container", "libvirt", "static", "unspec", "reserved"]
KEYS = ["app", "tier", "vm"]
VALUES = ["a", "b", "c", ""]
OPS = ["In", "NotIn", "Exists", "DoesNotExist"]

label_sets = st.lists(st.tuples(st.sampled_from(LABEL_SOURCES), st.sampled_from(KEYS),
                                st.sampled_from(VALUES)), max_size=6)
sel_keys = st.tuples(st.sampled_from(["", "any"] + LABEL_SOURCES), st.sampled_from(KEYS)).map(
    lambda sk: f"{sk[0]}:{sk[1]}" if sk[0] else sk[1])
expressions = st.lists(st.tuples(sel_keys, st.sampled_from(OPS),
                                 st.lists(st.sampled_from(VALUES), min_size=1, max_size=3)).map(
    lambda e: (e[0], e[1], e[2] if e[1] in ("In", "NotIn") else [])), max_size=3)
match_labels = st.dictionaries(sel_keys, st.sampled_from(VALUES), max_size=3)


def reference_match(labels: list[tuple[str, str, str]], ml: dict, exprs: list) -> bool:
    """Kubernetes semantics, written independently: a key without a source (or any:) sees
    labels of every source; all requirements must hold."""
    def values(sel_key):
        src, _, key = sel_key.rpartition(":")
        return {v for (s, k, v) in labels if k == key and src in ("", "any", s)}

    for key, value in ml.items():
        if value not in values(key):
            return False
    for key, op, vals in exprs:
        found = values(key)
        ok = {"In": bool(found & set(vals)), "NotIn": not (found & set(vals)),
              "Exists": bool(found), "DoesNotExist": not found}[op]
        if not ok:
            return False
    return True


@settings(max_examples=400, deadline=None)
@given(labels=label_sets, ml=match_labels, exprs=expressions)
def test_matches_agrees_with_reference(labels, ml, exprs):
    sel = EndpointSelector.build(ml, exprs)
    got = sel.matches(LabelSet(Label(*l) for l in labels))
    # LabelSet deduplicates; the reference works on the raw list, which must not matter.
    assert got == reference_match(labels, ml, exprs)


# SEL and PORT -------------------------------------------------------------------------

@pytest.mark.parametrize("value, kind, text", [
    ("cidr:10.0.0.0/8", "cidr", "cidr:10.0.0.0/8"),
    ("cidr:10.0.0.1/8", "cidr", "cidr:10.0.0.0/8"),
    ("cidr:192.0.2.1", "cidr", "cidr:192.0.2.1/32"),
    ("cidr:2001:db8::/32", "cidr", "cidr:2001:db8::/32"),
    ("entity:world", "entity", "entity:world"),
    ("entity:remote-node", "entity", "entity:remote-node"),
    ("app=web", "workload", "app=web"),
    (" app=web , tier = db ", "workload", "app=web,tier=db"),
    ("container:app=web", "workload", "container:app=web"),
    ("flag=", "workload", "flag="),
    ({"app": "web", "libvirt:vm": None}, "workload", "libvirt:vm,app=web"),
], ids=["cidr", "cidr-host-bits-masked", "cidr-bare-address", "cidr-v6", "entity", "entity-dash",
        "labels", "labels-whitespace", "labels-source", "empty-value", "mapping"])
def test_parse_sel(value, kind, text):
    spec = parse_sel(value)
    assert isinstance(spec, PeerSpec)
    assert spec.kind == kind
    assert str(spec) == text


def test_parse_sel_labels_default_to_unspec():
    assert parse_sel("app=web,container:x=1").labels == LabelSet(
        [Label("unspec", "app", "web"), Label("container", "x", "1")])


@pytest.mark.parametrize("value, error", [
    ("", "a selector is cidr:<prefix>, entity:<name>, endpoint:<name> or k=v,..."),
    ("   ", "a selector is cidr:<prefix>"),
    (None, "a selector is cidr:<prefix>"),
    ("cidr:10.0.0.0/33", "'cidr:10.0.0.0/33': "),
    ("cidr:nope", "'cidr:nope': "),
    ("entity:cluster", "entity must be one of host, world, unmanaged, health, init, remote-node"),
    ("entity:bogus", "entity must be one of"),
    ("app", "'app' is not key=value"),
    ("app=web,", "'' is not key=value"),
    ("bogus:app=web", "unknown label source 'bogus'"),
    ("-app=web", "'-app' is not a valid label key"),
    ("app=web server", "'web server' is not a valid label value"),
    ({}, "no labels given"),
    ({"app": "bad value"}, "is not a valid label value"),
], ids=["empty", "blank", "none", "cidr-prefix-too-long", "cidr-garbage", "entity-not-an-identity",
        "entity-unknown", "no-equals", "trailing-comma", "unknown-source", "bad-key", "bad-value",
        "empty-mapping", "mapping-bad-value"])
def test_parse_sel_invalid(value, error):
    with pytest.raises(SelectorError) as info:
        parse_sel(value)
    assert error in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("80/tcp", (6, 80)),
    ("53/udp", (17, 53)),
    ("53/UDP", (17, 53)),
    ("9/sctp", (132, 9)),
    ("8/icmp", (1, 8)),
    ("128/icmpv6", (58, 128)),
    ("0/tcp", (6, 0)),
    ("65535/tcp", (6, 65535)),
    ("255/icmp", (1, 255)),
    (" 443/tcp ", (6, 443)),
], ids=["tcp", "udp", "upper", "sctp", "icmp", "icmpv6", "zero", "max", "icmp-max", "whitespace"])
def test_parse_port(text, expected):
    assert parse_port(text) == expected


@pytest.mark.parametrize("text, error", [
    ("80", "expected PORT/PROTO"),
    ("80/", "expected PORT/PROTO"),
    ("/tcp", "expected PORT/PROTO"),
    ("http/tcp", "expected PORT/PROTO"),
    ("-1/tcp", "expected PORT/PROTO"),
    ("80/any", "expected PORT/PROTO"),
    ("80/gre", "expected PORT/PROTO"),
    ("65536/tcp", "65536 is out of range (0-65535)"),
    ("256/icmp", "256 is out of range (0-255)"),
    ("300/icmpv6", "300 is out of range (0-255)"),
], ids=["no-proto", "empty-proto", "no-number", "name", "negative", "any", "unknown-proto",
        "port-too-big", "icmp-too-big", "icmpv6-too-big"])
def test_parse_port_invalid(text, error):
    with pytest.raises(SelectorError) as info:
        parse_port(text)
    assert error in str(info.value)
