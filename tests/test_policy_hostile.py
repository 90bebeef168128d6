"""Hostile policy text: each input that once crashed, stalled or tracebacked the loader
(issue 12) is now one PolicyError naming the file, the document and the field path;
and the limits (16 MiB, depth 64, 2,000,000 nodes, 100,000 nodes from aliases) sit
exactly where they are documented."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stockade.errors import PolicyErrors
from stockade.policy.api.loader import load_file, load_text, parse_documents
from stockade.policy.api.safeload import LIMITS, Limits, ReadError, check_size, read_yaml
from stockade.policy.api.validation import sanitize_document

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
HEAD = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
        "spec:\n  endpointSelector: {}\n")
JHEAD = '{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p"}, '
DEEP = "nesting deeper than 64 levels"
ALLOWED = "(only !!str, !!int, !!float, !!bool, !!null, !!seq and !!map)"


def _laughs(levels: int, fan: int = 9) -> str:
    """The classic "billion laughs": each anchor a list of ``fan`` aliases of the last."""
    lines = ["  x:", "    l0: &l0 lol"]
    lines += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]" for i in range(1, levels + 1)]
    return HEAD + "\n".join(lines) + "\n"


# (id, file name, text, [(document, path, message)])
CASES = [
    ("30000-brackets", "x.yaml", "[" * 30000,
     [(0, "[0]" * 63, f"{DEEP} (line 1, column 65)")]),
    ("30000-brackets-in-a-policy", "x.yaml", HEAD + "  ingress: " + "[" * 30000,
     [(0, "spec.ingress" + "[0]" * 62, f"{DEEP} (line 6, column 74)")]),
    ("1000-flow-mappings", "x.yaml", HEAD + "  ingress: " + "{a: " * 1000 + "x" + "}" * 1000,
     [(0, "spec.ingress" + ".a" * 62, f"{DEEP} (line 6, column 260)")]),
    ("1000-block-sequences", "x.yaml", HEAD + "  ingress:\n" + "  - " * 1000 + "x\n",
     [(0, "spec.ingress" + "[0]" * 62, f"{DEEP} (line 7, column 251)")]),
    ("1000-json-arrays", "x.json", JHEAD + '"spec": ' + "[" * 1000 + "]" * 1000 + "}",
     [(0, "spec" + "[0]" * 63, DEEP)]),
    ("1000-json-objects", "x.json", JHEAD + '"spec": ' + '{"a": ' * 1000 + "1" + "}" * 1001,
     [(0, "spec" + ".a" * 63, DEEP)]),
    ("alias-bomb-9x9", "x.yaml", _laughs(9),
     [(0, "spec.x.l6[0]", "aliases expand to more than 100,000 nodes (line 13, column 14)")]),
    ("tag-int", "x.yaml", HEAD + "  ingress: [{toPorts: [{ports: [{port: !!int cluster}]}]}]\n",
     [(0, "spec.ingress[0].toPorts[0].ports[0].port", "'cluster' is not an integer (line 6, column 40)")]),
    ("tag-timestamp", "x.yaml", HEAD + "  description: !!timestamp 2001-13-45\n",
     [(0, "spec.description", f"tag !!timestamp is not allowed {ALLOWED} (line 6, column 16)")]),
    ("tag-bool", "x.yaml", HEAD + "  enableDefaultDeny: {ingress: !!bool maybe}\n",
     [(0, "spec.enableDefaultDeny.ingress", "'maybe' is not a boolean (line 6, column 32)")]),
    ("tag-python", "x.yaml", HEAD + "  description: !!python/object/apply:os.system [true]\n",
     [(0, "spec.description", f"tag !!python/object/apply:os.system is not allowed {ALLOWED} "
                              "(line 6, column 16)")]),
    ("tag-local", "x.yaml", "apiVersion: cilium.io/v2\nkind: !kind CiliumNetworkPolicy\n",
     [(0, "kind", f"tag !kind is not allowed {ALLOWED} (line 2, column 7)")]),
    ("tag-seq-on-a-mapping", "x.yaml", HEAD + "  ingress: !!seq {a: 1}\n",
     [(0, "spec.ingress", "tag !!seq cannot be used on a mapping (line 6, column 12)")]),
    ("tag-null-not-null", "x.yaml", HEAD + "  description: !!null x\n",
     [(0, "spec.description", "'x' is not null (line 6, column 16)")]),
    ("int-4301-digits", "x.yaml", HEAD + "  ingress: [{toPorts: [{ports: [{port: " + "1" * 4301 + "}]}]}]\n",
     [(0, "spec.ingress[0].toPorts[0].ports[0].port",
       "integer too large (more than 4,300 digits) (line 6, column 40)")]),
    ("hex-past-4300-digits", "x.yaml", HEAD + "  description: 0x" + "f" * 3600 + "\n",
     [(0, "spec.description", "integer too large (more than 4,300 digits) (line 6, column 16)")]),
    ("sexagesimal-past-4300-digits", "x.yaml", HEAD + "  description: " + "59:" * 3000 + "1\n",
     [(0, "spec.description", "integer too large (more than 4,300 digits) (line 6, column 16)")]),
    ("sexagesimal-float-of-101-parts", "x.yaml", HEAD + "  description: " + "1:" * 101 + "1.5\n",
     [(0, "spec.description", "'" + "1:" * 19 + "1... is not a float (more than 100 ':' parts) "
                              "(line 6, column 16)")]),
    ("json-int-4301-digits", "x.json", JHEAD + '"spec": {"x": ' + "1" * 4301 + "}}",
     [(0, "spec.x", "integer too large (more than 4,300 digits)")]),
    ("int-key", "x.yaml", HEAD + "  ingress: [{fromEndpoints: [{matchLabels: {1: db}}]}]\n",
     [(0, "spec.ingress[0].fromEndpoints[0].matchLabels", "keys must be strings, not int (line 6, column 45)")]),
    ("null-key", "x.yaml", HEAD.replace("{}", "\n    matchLabels:\n      ? null\n      : db"),
     [(0, "spec.endpointSelector.matchLabels", "keys must be strings, not null (line 7, column 9)")]),
    ("bool-key", "x.yaml", HEAD + "  enableDefaultDeny: {yes: true}\n",
     [(0, "spec.enableDefaultDeny", "keys must be strings, not bool (line 6, column 23)")]),
    ("list-key", "x.yaml", HEAD + "  ? [a, b]\n  : c\n",
     [(0, "spec", "keys must be strings, not list (line 6, column 5)")]),
    ("recursive-alias", "x.yaml", HEAD + "  ingress: &r [{fromEndpoints: *r}]\n",
     [(0, "spec.ingress[0].fromEndpoints",
       "alias *r is recursive (it is inside the node it refers to) (line 6, column 32)")]),
    ("undefined-alias", "x.yaml", HEAD + "  ingress: *nowhere\n",
     [(0, "spec.ingress", "alias *nowhere refers to no anchor (line 6, column 12)")]),
    ("anchor-twice", "x.yaml", HEAD + "  ingress: &a []\n  egress: &a []\n",
     [(0, "spec.egress", "anchor &a is defined twice (line 7, column 11)")]),
    ("merge-of-a-scalar", "x.yaml", HEAD + "  <<: 5\n",
     [(0, "spec.<<", "a merge key (<<) needs a mapping or a list of mappings, not int (line 6, column 7)")]),
    ("json-nan", "x.json", JHEAD + '"spec": {"endpointSelector": {}, "x": [1, NaN]}}',
     [(0, "spec.x[1]", "NaN is not valid JSON (numbers must be finite)")]),
    ("json-infinity", "x.json", "[{}, " + JHEAD + '"spec": -Infinity}]',
     [(1, "spec", "-Infinity is not valid JSON (numbers must be finite)")]),
    ("json-syntax-in-second-document", "x.json", "[{}, " + JHEAD + '"spec": {"a": [1,, 2]}}]',
     [(1, "spec.a[1]", "cannot parse at line 1, column 112: Expecting value")]),
    ("control-character", "x.yaml", HEAD + "  description: a\x01b\n",
     [(None, "", "cannot parse at line 6: unacceptable character #x0001: "
                 "control characters are not allowed")]),
    ("lone-surrogate", "x.yaml", HEAD + "  description: \ud800\n",
     [(None, "", "not valid Unicode text: surrogates not allowed at character 115")]),
    ("second-item-of-a-top-level-list", "x.yaml", "- {a: 1}\n- {metadata: {name: two}, b: [[!!int x]]}\n",
     [(1, "b[0][0]", "'x' is not an integer (line 2, column 32)")]),
    ("item-of-a-List", "x.yaml", "kind: List\nitems:\n- {}\n- {metadata: {name: i}, spec: {1: x}}\n",
     [(1, "spec", "keys must be strings, not int (line 4, column 32)")]),
    ("third-document-of-a-stream", "x.yaml", "a: 1\n---\n- {}\n- {}\n---\nb: [&x 1, &x 2]\n",
     [(3, "b[1]", "anchor &x is defined twice (line 6, column 11)")]),
]


@pytest.mark.parametrize("name, text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_policy_error(name, text, expected):
    with pytest.raises(PolicyErrors) as info:
        load_text(text, name)
    got = [(e.doc_index, e.path, e.msg) for e in info.value.errors]
    assert got == expected
    assert all(e.file == name for e in info.value.errors)


def test_rendering_names_file_document_name_and_path():
    text = HEAD.replace("{name: p}", "{name: web}") + "  ingress: [{fromEndpoints: [{matchLabels: {1: db}}]}]\n"
    with pytest.raises(PolicyErrors) as info:
        load_text(text, "web.yaml")
    assert str(info.value) == ("web.yaml: document 0 (web): spec.ingress[0].fromEndpoints[0].matchLabels: "
                               "keys must be strings, not int (line 6, column 45)")


# ---------------------------------------------------------------- the limits, exactly
def _nested(depth: int) -> str:
    """A policy whose spec.x makes the document ``depth`` collections deep."""
    return HEAD + "  x: " + "[" * (depth - 2) + "]" * (depth - 2) + "\n"


def _nested_json(depth: int) -> str:
    return JHEAD + '"spec": {"endpointSelector": {}, "x": ' + "[" * (depth - 2) + "]" * (depth - 2) + "}}"


@pytest.mark.parametrize("text, name", [(_nested(64), "x.yaml"), (_nested_json(64), "x.json"),
                                        ("[" * 64 + "]" * 64, "x.yaml"), ("[" * 64 + "]" * 64, "x.json")],
                         ids=["yaml", "json", "yaml-top-level", "json-top-level"])
def test_depth_64_is_read(text, name):
    with pytest.raises(PolicyErrors) as info:
        load_text(text, name)
    assert DEEP not in str(info.value)  # read; then the schema refuses it


@pytest.mark.parametrize("text, name, path", [
    (_nested(65), "x.yaml", "spec.x" + "[0]" * 62),
    (_nested_json(65), "x.json", "spec.x" + "[0]" * 62),
    ("[" * 65 + "]" * 65, "x.yaml", "[0]" * 63),
    ("[" * 65 + "]" * 65, "x.json", "[0]" * 63),
    ("[" * 5000 + "]" * 5000, "x.json", "[0]" * 63),  # too deep for json's C scanner
], ids=["yaml", "json", "yaml-top-level", "json-top-level", "json-past-the-recursion-limit"])
def test_depth_65_is_refused(text, name, path):
    with pytest.raises(PolicyErrors) as info:
        load_text(text, name)
    [err] = info.value.errors
    assert (err.doc_index, err.path) == (0, path) and err.msg.startswith(DEEP)


def test_node_limit_2000000():
    """The root list and 1,999,999 scalars are read; one more scalar is refused."""
    assert LIMITS.nodes == 2_000_000
    at_limit = "[" + "0," * 1_999_999 + "]"
    assert len(read_yaml(check_size(at_limit))[0]) == 1_999_999
    with pytest.raises(PolicyErrors) as info:
        load_text("[" + "0," * 2_000_000 + "]", "x.yaml")
    [err] = info.value.errors
    assert (err.doc_index, err.path, err.msg) == (
        1_999_999, "", "more than 2,000,000 nodes (an alias counts as what it expands to) "
                       "(line 1, column 4000000)")


def test_node_limit_counts_what_aliases_expand_to():
    limits = Limits(nodes=1000, alias_nodes=10**9)
    ten = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"  # 10 nodes; with the root mapping and key a: 12
    read_yaml(check_size(ten + "b: [" + ", ".join(["*a"] * 98) + "]\n"), limits)  # 12 + 2 + 980 nodes
    with pytest.raises(ReadError, match=r"more than 1,000 nodes \(an alias counts as what it expands to\)"):
        read_yaml(check_size(ten + "b: [" + ", ".join(["*a"] * 99) + "]\n"), limits)


def test_alias_nodes_100000():
    ten = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n"
    docs = read_yaml(check_size(ten + "b: [" + ", ".join(["*a"] * 10_000) + "]\n"))
    assert len(docs[0]["b"]) == 10_000 and docs[0]["b"][0] is docs[0]["a"]
    with pytest.raises(ReadError, match="aliases expand to more than 100,000 nodes") as info:
        read_yaml(check_size(ten + "b: [" + ", ".join(["*a"] * 10_001) + "]\n"))
    assert info.value.path == ("b", 10_000)


MIB16 = 16 * 1024 * 1024


@pytest.mark.parametrize("text", ["#" * (MIB16 + 1), "#é" * (MIB16 // 3 + 1)], ids=["ascii", "two-byte"])
def test_text_over_16_mib_is_refused(text):
    with pytest.raises(PolicyErrors) as info:
        load_text(text, "big.yaml")
    assert [(e.file, e.doc_index, e.path, e.msg) for e in info.value.errors] == [
        ("big.yaml", None, "", "larger than 16 MiB")]


def test_text_of_16_mib_is_read():
    assert load_text("#" * MIB16, "big.yaml") == []


def test_file_over_16_mib_is_refused_without_reading_it_all(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MIB16 + 1))
    for p in (path, "/dev/zero"):  # /dev/zero never ends: only the limit stops the read
        with pytest.raises(PolicyErrors) as info:
            load_file(p)
        assert [(e.file, e.msg) for e in info.value.errors] == [(str(p), "larger than 16 MiB")]


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(HEAD.encode() + "  description: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyErrors) as info:
        load_file(path)
    assert [(e.file, e.doc_index, e.msg) for e in info.value.errors] == [
        (str(path), None, "not UTF-8 text: byte 0xe9 at line 6 (offset 118: invalid continuation byte)")]


def test_huge_string_is_read_and_messages_stay_short():
    name = "x" * 5_000_000
    with pytest.raises(PolicyErrors) as info:
        load_text(HEAD.replace("{name: p}", "{name: " + name + "}") + "  ingress: *a\n", "x.yaml")
    [err] = info.value.errors
    assert err.doc_name == "x" * 256 + "..." and err.path == "spec.ingress"


def test_many_errors_stop_at_100():
    doc = HEAD.replace("{}", "{matchLabels: {app: web}}") + "  bogus: 1\n"
    with pytest.raises(PolicyErrors) as info:
        load_text("---\n".join([doc.replace("name: p", f"name: p{i}") for i in range(500)]), "x.yaml")
    errors = info.value.errors
    assert len(errors) == 101 and errors[99].doc_index == 99
    assert errors[100].msg == "stopped after 100 errors (there may be more); documents 100 to 499 were not checked"


# ---------------------------------------------------------------- what is accepted
def test_yaml_1_1_scalars_resolve_as_safeloader_does_timestamps_stay_strings():
    text = ("a: 0x1f\nb: 017\nc: 1_000\nd: 1:30\ne: [yes, No, on, OFF, true]\nf: [~, null, '']\n"
            "g: [1.5, .inf, -.Inf, 1e5, 190:20:30.15]\nh: 2001-12-14\ni: !!str 12\nj: !!int '12'\n"
            "k: !!float 1\nl: ! 12\nm: 0b101\nn: -0o17\n")
    [doc] = read_yaml(check_size(text))
    assert doc == {"a": 31, "b": 15, "c": 1000, "d": 90, "e": [True, False, True, False, True],
                   "f": [None, None, ""], "g": [1.5, float("inf"), float("-inf"), "1e5", 685230.15],
                   "h": "2001-12-14", "i": "12", "j": 12, "k": 1.0, "l": 12, "m": 5, "n": "-0o17"}
    ref = yaml.safe_load(text)
    assert ref["h"] != "2001-12-14" and {k: v for k, v in ref.items() if k != "h"} == {
        k: v for k, v in doc.items() if k != "h"}


@pytest.mark.parametrize("text", ["a: " + "1:" * 100 + "1.5\n", "a: " + "59:" * 2000 + "1\n",
                                  "a: 0x" + "f" * 3500 + "\n", "a: 0" + "7" * 4700 + "\n"],
                         ids=["float-100-parts", "int-2000-parts", "hex-3500-digits", "octal-4700-digits"])
def test_numbers_up_to_the_limits_are_as_safeloader_reads_them(text):
    assert read_yaml(check_size(text)) == [yaml.safe_load(text)]


def test_merge_keys_work_as_in_safeloader():
    text = "base: &b {x: 1, y: 2}\nc: {<<: *b, y: 3}\nd: {<<: [{x: 9}, *b], z: 1}\ne: {<<: [*b, {x: 9}]}\n"
    assert read_yaml(check_size(text)) == [yaml.safe_load(text)]


def test_bench_file_loads_as_before():
    """The performance issue's 100,000-entry file (10,000 documents): the same policies
    as the loader gave before (PyYAML's CSafeLoader)."""
    sys.path.insert(0, str(ROOT))
    from bench.common import stockade_policies
    text = stockade_policies([(f"p{i}", list(range(1000, 1010))) for i in range(10000)], "srv")
    assert len(text) > 4_000_000
    policies = load_text(text, "bench.yaml")
    before = [sanitize_document(d, source="bench.yaml") for d in yaml.load_all(text, Loader=yaml.CSafeLoader)]
    assert len(policies) == 10000 and policies == before


# ---------------------------------------------------------------- the CLI as deployed
NASTY = {
    "brackets.yaml": ("[" * 30000).encode(),
    "laughs.yaml": _laughs(9).encode(),
    "tag.yaml": (HEAD + "  ingress: [{toPorts: [{ports: [{port: !!int cluster}]}]}]\n").encode(),
    "key.yaml": (HEAD + "  ingress: [{fromEndpoints: [{matchLabels: {1: db}}]}]\n").encode(),
    "latin1.yaml": HEAD.encode() + b"  description: caf\xe9\n",
    "deep.json": (JHEAD + '"spec": ' + "[" * 100000).encode(),
    "nan.json": (JHEAD + '"spec": NaN}').encode(),
    "notamap.yaml": b"just a string\n",
}


def test_cli_validate_exits_1_with_every_message_and_no_traceback(tmp_path):
    paths = []
    for name, data in NASTY.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(MIB16 + 1)
    paths.append(str(big))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "agent"), str(ROOT / "webui")])}
    r = subprocess.run([sys.executable, "-m", "stockade.cli.main", "policy", "validate", *paths],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: ")
    for name, needle in [
        ("brackets.yaml", f"document 0: {'[0]' * 63}: {DEEP}"),
        ("laughs.yaml", "document 0 (p): spec.x.l6[0]: aliases expand to more than 100,000 nodes"),
        ("tag.yaml", "document 0 (p): spec.ingress[0].toPorts[0].ports[0].port: 'cluster' is not an integer"),
        ("key.yaml", "document 0 (p): spec.ingress[0].fromEndpoints[0].matchLabels: keys must be strings, not int"),
        ("latin1.yaml", "not UTF-8 text: byte 0xe9 at line 6"),
        ("deep.json", f"document 0: spec{'[0]' * 63}: {DEEP}"),
        ("nan.json", "document 0 (p): spec: NaN is not valid JSON"),
        ("notamap.yaml", "document 0: must be of type object, not str"),
        ("big.yaml", "larger than 16 MiB"),
    ]:
        assert any(f"{tmp_path / name}: {needle}" in line for line in lines), (name, r.stderr[:3000])


def test_cli_policy_test_and_services_files_are_read_safely(tmp_path):
    bad = tmp_path / "cases.yaml"
    bad.write_text("[" * 30000)
    policy = tmp_path / "p.yaml"
    policy.write_text(HEAD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "agent"), str(ROOT / "webui")])}
    for argv in (["policy", "test", str(bad), str(policy)],
                 ["policy", "validate", "--services", str(bad), str(policy)]):
        r = subprocess.run([sys.executable, "-m", "stockade.cli.main", *argv], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"error: {bad}: {'[0]' * 64}: {DEEP} (line 1, column 65)" in r.stderr, r.stderr


def test_json_dumped_corpus_reads_the_same():
    """A JSON file holds what the same documents in YAML hold."""
    path = ROOT / "tests" / "policies" / "valid" / "selectors.yaml"
    docs = parse_documents(path.read_text(), "s.yaml")
    assert parse_documents(json.dumps(docs), "s.json") == docs
