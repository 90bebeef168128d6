"""Fuzzing the policy loader: whatever the text, load_text gives Policies or PolicyErrors
(never another exception, never a crash) within 1 s of CPU time per input; and where
both accept, the YAML reader gives what PyYAML's SafeLoader gives (timestamps aside).

About 22,000 hypothesis examples in all, derandomized so CI sees the same ones every
run; every one goes through the loader (load_text or load_file) under cpu_limit. The
inputs are built by tests/policyfuzz.py, which bench/policy_fuzz_bench.py also uses for
its 1,000,000 random ones.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import contextmanager

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policyfuzz as pf
from stockade.errors import PolicyErrors
from stockade.policy.api.loader import load_file
from stockade.policy.api.safeload import ReadError, check_size, read_yaml

pytestmark = pytest.mark.pure

CPU_LIMIT_S = 1.0


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@contextmanager
def cpu_limit(name: str, text: str | bytes):
    """The block may use less than CPU_LIMIT_S of CPU time (not wall time), whatever it raises."""
    start = time.process_time()
    try:
        yield
    finally:
        cpu = time.process_time() - start
        assert cpu < CPU_LIMIT_S, f"{cpu:.2f} s of CPU for {name}: {text[:300]!r}"


def assert_loads(text: str, name: str) -> None:
    """Only PolicyErrors escape the loader (policyfuzz.check), within the CPU limit."""
    with cpu_limit(name, text):
        pf.check(text, name)


POLICY_KEYS = ["apiVersion", "kind", "metadata", "name", "spec", "specs", "ingress", "egress",
               "ingressDeny", "toPorts", "ports", "port", "endPort", "protocol", "fromEndpoints",
               "toEndpoints", "matchLabels", "matchExpressions", "key", "operator", "values",
               "endpointSelector", "fromCIDR", "toCIDRSet", "cidr", "except", "icmps", "fields",
               "type", "family", "rules", "http", "path", "method", "headers", "items", "app"]
keys = st.sampled_from(POLICY_KEYS) | st.text(max_size=8)
leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
          | st.sampled_from(pf.SCALAR_TEXTS))
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        keys | st.integers(-2, 2) | st.none() | st.booleans(), inner, max_size=4),
    max_leaves=25)
styles = st.sampled_from(["block", "flow", "json"])


@fuzz(4000)
@given(value=values, where=st.sampled_from(["spec", "doc", "ingress", "selector"]), style=styles)
def test_random_structures(value, where, style):
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "r"},
           "spec": {"endpointSelector": {}}}
    if where == "spec":
        doc["spec"] = value
    elif where == "doc":
        doc = value
    elif where == "ingress":
        doc["spec"]["ingress"] = value
    else:
        doc["spec"]["endpointSelector"] = value
    assert_loads(*pf.dump(doc, style))


@fuzz(4000)
@given(doc=st.sampled_from(pf.VALID_DOCS), choices=st.lists(st.integers(0, 1000), max_size=8),
       op=st.sampled_from(pf.DOC_OPS), value=values, style=styles)
def test_corpus_mutations(doc, choices, op, value, style):
    assert_loads(*pf.dump(pf.mutate_doc(doc, choices, op, value), style))


payloads = (st.sampled_from(pf.SNIPPETS) | st.text(alphabet=pf.SYNTAX + "ab01", min_size=1, max_size=6)
            | st.text(st.characters(codec=None), min_size=1, max_size=3))
mutations = st.lists(st.tuples(st.sampled_from(pf.MUTATION_OPS), st.integers(0, 1 << 20),
                               st.integers(0, 60), payloads), min_size=1, max_size=5)


@fuzz(6000)
@given(file=st.sampled_from(pf.CORPUS_TEXTS), muts=mutations)
def test_text_mutations(file, muts):
    name, text = file
    assert_loads(pf.mutate_text(text, muts), name)


@fuzz(2000)
@given(levels=st.integers(1, 10), fan=st.integers(1, 20), element=st.sampled_from(pf.BOMB_ELEMENTS),
       place=st.sampled_from(pf.BOMB_PLACES))
def test_alias_bombs(levels, fan, element, place):
    assert_loads(pf.alias_bomb(levels, fan, element, place), "bomb.yaml")


@fuzz(1000)
@given(kind=st.sampled_from(pf.NEST_KINDS),
       depth=st.sampled_from([1, 63, 64, 65, 66, 1000, 30000]) | st.integers(1, 100_000),
       closed=st.booleans(), in_doc=st.booleans())
def test_nesting_bombs(kind, depth, closed, in_doc):
    assert_loads(*pf.nesting_bomb(kind, depth, closed, in_doc))


@fuzz(1500)
@given(tag=st.sampled_from(pf.TAGS), scalar=st.sampled_from(pf.SCALAR_TEXTS) | st.text(max_size=6),
       quoted=st.booleans(), field=st.sampled_from(["port", "protocol", "endPort", "x"]))
def test_tags(tag, scalar, quoted, field):
    value = "'" + scalar.replace("'", "''") + "'" if quoted else scalar
    assert_loads(pf.HEADER + f"  ingress: [{{toPorts: [{{ports: [{{{field}: {tag} {value}}}]}}]}}]\n",
                 "tag.yaml")


@fuzz(500)
@given(data=st.binary(max_size=200) | st.sampled_from(pf.CORPUS_TEXTS).map(lambda f: f[1].encode()),
       garbage=st.binary(min_size=1, max_size=4), pos=st.integers(0, 10_000),
       suffix=st.sampled_from([".yaml", ".json"]))
def test_files_of_any_bytes(data, garbage, pos, suffix):
    pos %= len(data) + 1
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        content = data[:pos] + garbage + data[pos:]
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        with cpu_limit(path, content):
            try:
                load_file(path)
            except PolicyErrors as exc:
                assert all(e.file == path for e in exc.errors)
    finally:
        os.unlink(path)


# ---------------------------------------------------------------- same as SafeLoader
class RefLoader(yaml.CSafeLoader):
    """What the loader used before, with timestamps left as strings (as the reader does)."""


RefLoader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))

# Why the reader may refuse what SafeLoader accepts (every one a documented limit).
REFUSALS = ("keys must be strings", "integer too large", "is not an integer", "is not a float",
            "is not a boolean", "is not null", "is recursive", "aliases expand", "nesting deeper",
            "nodes (an alias")

plain = (st.sampled_from([s for s in pf.SCALAR_TEXTS if s and s[0] not in "-<=" and " " not in s])
         | st.text(alphabet="abxoeEn019_:.+-", min_size=1, max_size=8).filter(lambda s: s[0] not in "-:"))
quoted = plain.map(lambda s: "'" + s + "'") | plain.map(lambda s: '"' + s + '"')
tagged = st.tuples(st.sampled_from(["!!str", "!!int", "!!float", "!!bool", "!!null", "!"]),
                   plain | quoted).map(" ".join)
scalar = plain | quoted | tagged
# Every document defines anchors a (any node), b (a mapping) and c (a list) first; the
# rest refers to them (an alias, a merge key) and sometimes defines one more, d.
alias = st.sampled_from(["*a", "*b", "*c", "*d"])
leaf = scalar | alias


def _collections(inner):
    seq = st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
    mapping = st.lists(st.tuples(scalar, inner), max_size=3).map(
        lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}")
    return seq | mapping


def _flow(inner):
    merge = st.tuples(st.sampled_from(["*a", "*b", "[*b, *b]", "[*c]", "[{x: 1}, *b]"]), inner).map(
        lambda t: f"{{<<: {t[0]}, k: {t[1]}}}")
    return _collections(inner) | merge | _collections(inner).map(lambda n: f"&d {n}")


node = st.recursive(leaf, _flow, max_leaves=10)
plain_node = st.recursive(scalar, _collections, max_leaves=4)
anchors = st.tuples(plain_node, scalar, plain_node, scalar).map(
    lambda t: f"_a: &a {t[0]}\n_b: &b {{x: {t[1]}, y: {t[2]}}}\n_c: &c [{t[3]}]\n")
body = st.lists(st.tuples(scalar, node), min_size=1, max_size=4).map(
    lambda kv: "".join(f"{k}: {v}\n" for k, v in kv))
document = st.tuples(anchors, body).map("".join) | st.tuples(anchors, node).map(
    lambda t: f"- {t[0].replace(chr(10), chr(10) + '  ')[:-2]}- {t[1]}\n")
stream = st.lists(document, min_size=1, max_size=2).map("---\n".join)


def _norm(value):
    """Equal-comparable: NaN is not equal to itself."""
    if isinstance(value, float) and math.isnan(value):
        return "<nan>"
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


@fuzz(3000)
@given(text=stream)
def test_same_as_safeloader(text):
    try:
        ref = list(yaml.load_all(text, Loader=RefLoader))
    except Exception:  # noqa: BLE001 - SafeLoader's failures (tracebacks included) are not compared
        ref = None
    assert_loads(text, "stream.yaml")
    try:
        with cpu_limit("stream.yaml", text):
            got = read_yaml(check_size(text))
    except ReadError as exc:
        assert ref is None or any(r in exc.msg for r in REFUSALS), (exc.msg, text)
        return
    if ref is not None:
        assert _norm(got) == _norm(ref), text


@pytest.mark.parametrize("path", [p for p in pf.CORPUS_FILES if p.suffix == ".yaml"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_reads_as_safeloader_does(path):
    text = path.read_text()
    if path.name == "yaml-syntax.yaml":
        with pytest.raises(ReadError, match="did not find expected ',' or '}'"):
            read_yaml(check_size(text))
        with pytest.raises(yaml.YAMLError, match="did not find expected ',' or '}'"):
            list(yaml.load_all(text, Loader=RefLoader))
        return
    assert read_yaml(check_size(text)) == list(yaml.load_all(text, Loader=RefLoader))
