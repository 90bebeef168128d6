"""Hostile policy text for the loader's fuzz test (tests/test_policy_fuzz.py, hypothesis)
and its benchmark (bench/policy_fuzz_bench.py, a seeded ``random.Random``).

The input families: random structures, mutations of the valid corpus's documents,
text mutations of every corpus file, alias bombs, nesting bombs and tags. ``check``
loads one input and returns its CPU time; anything but PolicyErrors escapes.
"""
from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import yaml

from stockade.errors import PolicyError, PolicyErrors
from stockade.policy.api.loader import load_text

CORPUS = Path(__file__).resolve().parent / "policies"
CORPUS_FILES = sorted(p for p in CORPUS.rglob("*") if p.suffix in (".yaml", ".json"))
CORPUS_TEXTS = [(p.name, p.read_text()) for p in CORPUS_FILES]


def _valid_docs() -> list:
    docs = []
    for p in sorted((CORPUS / "valid").iterdir()):
        text = p.read_text()
        data = [json.loads(text)] if p.suffix == ".json" else list(yaml.safe_load_all(text))
        for d in data:
            docs.extend(d if isinstance(d, list) else [d])
    return docs


VALID_DOCS = _valid_docs()

HEADER = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fuzz}\n"
          "spec:\n  endpointSelector: {}\n")

# Characters that mean something to YAML or JSON, and text that stresses the loader.
SYNTAX = "[]{}:,-?&*!|>'\"%@`#~<=\\. \n\t\r"
SNIPPETS = [
    "&a ", "*a", "&b ", "*b", "<<: ", "<<: *a", "? ", "- ", ": ", "{", "}", "[", "]", "\n- ",
    "\n  ", "!!int ", "!!str ", "!!float ", "!!bool ", "!!null ", "!!seq ", "!!map ",
    "!!timestamp ", "!!binary ", "!!set ", "!!omap ", "!!pairs ", "!!merge ", "!!value ",
    "!!python/object/apply:os.system ['true'] ", "!foo ", "! ", "!<tag:yaml.org,2002:int> ",
    "%YAML 1.1\n---\n", "%TAG !! tag:example.com,2000:\n---\n", "---\n", "...\n",
    "cluster", "maybe", "2001-13-45", "2001-12-14", "0x1F", "017", "0b101", "1_000", "1:30",
    "190:20:30.15", ".inf", "-.INF", ".NaN", "yes", "Off", "~", "null", "=", "1e400",
    "9" * 4301, "0x" + "f" * 4000, "1:" * 2500 + "1", "\x00", "\x01", "\ufeff", "\u2028",
    "\U0001f600", "NaN", "Infinity", '"\\ud800"', "\"\\u0000\"", "[" * 70, "{a: " * 70,
    "'" + "x" * 5000 + "'", "matchLabels: {1: db}", "? null\n: x", "? [a]\n: b",
]
SCALAR_TEXTS = [
    "0", "80", "-1", "+12", "0x1f", "0X1F", "017", "08", "0o17", "0b101", "0b_", "1_000",
    "1:30", "1:60", "190:20:30.15", "1.5", "1.", ".5", "1e5", "1.0e+5", "-.inf", ".NaN",
    ".nan", "yes", "Yes", "YES", "no", "on", "Off", "true", "False", "y", "n", "~", "null",
    "Null", "NULL", "", "2001-12-14", "2001-12-14 21:59:43.10 -5", "2001-13-45", "<<", "=",
    "TCP", "app", "world", "a b", "9" * 30, "-0", "0_0", "_1", "1__0", "0x_", "- x",
    "1:" * 180 + "1.5", "1:" * 99 + "1.5", "59:" * 2500 + "1", "9" * 400 + ".5",
]
TAGS = ["!!int", "!!str", "!!float", "!!bool", "!!null", "!!seq", "!!map", "!!timestamp",
        "!!binary", "!!set", "!!omap", "!!merge", "!!python/name:os.system", "!foo", "!",
        "!<tag:yaml.org,2002:int>", "!<tag:yaml.org,2002:str>", "!e!x"]

# An element repeated by an alias bomb, and where the bomb goes.
BOMB_ELEMENTS = ["x", "[1]", "{a: 1}", "{fromEntities: [world]}", "{port: '80'}",
                 "{toPorts: [{ports: [{port: '80'}]}]}", "[[a, b], {c: d}]"]
BOMB_PLACES = ["description", "ingress", "ports", "unknown", "root-list", "list-items",
               "merge", "labels", "valid"]


def alias_bomb(levels: int, fan: int, element: str, place: str) -> str:
    """``levels`` anchors, each a list of ``fan`` aliases of the one before (the first
    holds ``element``), so the last expands to fan**levels elements, at ``place``."""
    if place == "valid":
        return valid_bomb(fan)
    chain = [f"&a0 {element}"]
    for i in range(1, levels + 1):
        chain.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    anchors = "[" + ", ".join(chain) + "]"
    last = f"*a{levels}"
    if place == "description":
        return HEADER + f"  description: {anchors}\n  egress: {last}\n"
    if place == "ingress":
        return HEADER + f"  egress: {anchors}\n  ingress: {last}\n"
    if place == "ports":
        return HEADER + f"  ingress:\n  - toPorts: [{{ports: {anchors}}}, {{ports: {last}}}]\n"
    if place == "unknown":
        return HEADER + f"  bogus: {anchors}\n  other: {last}\n"
    if place == "root-list":
        return f"- {anchors}\n- {last}\n"
    if place == "list-items":
        return f"kind: List\napiVersion: v1\nitems: [{anchors}, {last}]\n"
    if place == "merge":
        return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: m}}\n"
                f"x: &m {{a: {anchors}}}\nspec: {{<<: [*m, *m], endpointSelector: {{}}, y: {last}}}\n")
    return (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
            f"metadata: {{name: l, labels: {{a: {anchors}, b: {last}}}}}\nspec: {{endpointSelector: {{}}}}\n")


def valid_bomb(fan: int) -> str:
    """A valid policy that aliases fan-out at four levels (specs, ingress, toPorts,
    ports): fan**4 port entries, which the sanitizer then checks one by one."""
    def fan_out(anchor: str, first: str) -> str:
        return f"&{anchor}l [" + ", ".join([f"&{anchor} {first}"] + [f"*{anchor}"] * (fan - 1)) + "]"
    ports = fan_out("p", "{port: '80', protocol: TCP}")
    to_ports = fan_out("t", "{ports: " + ports + "}")
    ingress = fan_out("i", "{fromEntities: [world], toPorts: " + to_ports + "}")
    specs = fan_out("s", "{endpointSelector: {}, ingress: " + ingress + "}")
    return f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: v}}\nspecs: {specs}\n"


NEST_KINDS = ["flow-seq", "flow-map", "block-seq", "block-map", "json-seq", "json-map", "mixed"]


def nesting_bomb(kind: str, depth: int, closed: bool, in_doc: bool) -> tuple[str, str]:
    """(text, file name): ``depth`` nested collections, closed or not, as a whole file
    or as the value of spec.ingress."""
    if kind == "block-map":
        depth = min(depth, 3000)  # the text grows with depth squared
        body = "".join(" " * i + "a:\n" for i in range(depth)) + " " * depth + "x\n"
    elif kind == "block-seq":
        body = "- " * depth + "x\n"
    elif kind == "flow-seq":
        body = "[" * depth + ("]" * depth if closed else "")
    elif kind == "flow-map":
        body = "{a: " * depth + "x" + ("}" * depth if closed else "")
    elif kind == "mixed":
        body = "[{a: " * (depth // 2) + "x" + ("}]" * (depth // 2) if closed else "")
    elif kind == "json-seq":
        body = "[" * depth + ("]" * depth if closed else "")
    else:
        body = '{"a": ' * depth + "1" + ("}" * depth if closed else "")
    if kind.startswith("json"):
        if in_doc:
            body = ('{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": '
                    '{"name": "n"}, "spec": {"endpointSelector": {}, "ingress": ' + body + "}}")
        return body, "nest.json"
    if in_doc and not kind.startswith("block"):
        body = HEADER + "  ingress: " + body + "\n"
    return body, "nest.yaml"


def mutate_text(text: str, mutations) -> str:
    """mutations: (op, position, length, payload) with position taken modulo the text."""
    for op, pos, length, payload in mutations:
        pos = pos % (len(text) + 1)
        if op == "insert":
            text = text[:pos] + payload + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + length:]
        elif op == "replace":
            text = text[:pos] + payload + text[pos + len(payload):]
        elif op == "duplicate":
            text = text[:pos] + text[pos:pos + length] * 2 + text[pos + length:]
        elif op == "repeat":
            text = text[:pos] + payload * length + text[pos:]
    return text


MUTATION_OPS = ["insert", "delete", "replace", "duplicate", "repeat"]


def mutate_doc(doc, choices, op: str, value):
    """A copy of ``doc`` with the node picked by ``choices`` (child indexes, modulo)
    replaced, removed, duplicated or given ``value``'s type."""
    doc = copy.deepcopy(doc)
    parent, key, node = None, None, doc
    for c in choices:
        if isinstance(node, dict) and node:
            k = list(node)[c % len(node)]
        elif isinstance(node, list) and node:
            k = c % len(node)
        else:
            break
        parent, key, node = node, k, node[k]
    if parent is None:
        return value if op == "replace" else doc
    if op == "replace":
        parent[key] = value
    elif op == "delete":
        del parent[key]
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(node))
    elif op == "wrap":
        parent[key] = [node]
    elif op == "stringify":
        parent[key] = str(node)
    elif isinstance(parent, dict):
        parent[str(value)[:20]] = node
    return doc


DOC_OPS = ["replace", "delete", "duplicate", "wrap", "stringify", "rename"]


def dump(doc, style: str) -> tuple[str, str]:
    """(text, file name) of a document as YAML (block or flow) or JSON."""
    if style == "json":
        return json.dumps(doc), "doc.json"
    return yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                     default_flow_style=style == "flow", allow_unicode=True), "doc.yaml"


def check(text: str, name: str) -> float:
    """Load one input; returns its CPU time. Only PolicyErrors may escape the loader."""
    start = time.process_time()
    try:
        policies = load_text(text, name)
    except PolicyErrors as exc:
        assert exc.errors and all(isinstance(e, PolicyError) for e in exc.errors), exc
        assert all(e.file == name for e in exc.errors), exc
    else:
        assert isinstance(policies, list)
    return time.process_time() - start


# ---------------------------------------------------------------- random inputs (bench)
def _random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 4 or r < 0.5:
        return rng.choice([None, True, False, 0, 80, -1, 2**70, 1.5, float("inf"), "",
                           "TCP", "app", "world", "80", "10.0.0.0/8", rng.choice(SCALAR_TEXTS)])
    if r < 0.75:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["ingress", "egress", "toPorts", "ports", "port", "fromEndpoints", "matchLabels",
            "endpointSelector", "app", "cidr", "except", "icmps", "rules", "http", "x"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


FAMILIES = ["structure", "corpus-mutation", "text-mutation", "alias-bomb", "nesting-bomb", "tag"]


def random_input(rng: random.Random) -> tuple[str, str, str]:
    """(family, text, file name): one input of a randomly chosen family."""
    family = rng.choice(FAMILIES)
    if family == "structure":
        doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
               "metadata": {"name": "r"}, "spec": _random_value(rng)}
        return (family, *dump(doc, rng.choice(["block", "flow", "json"])))
    if family == "corpus-mutation":
        doc = mutate_doc(rng.choice(VALID_DOCS), [rng.randrange(100) for _ in range(rng.randrange(8))],
                         rng.choice(DOC_OPS), _random_value(rng))
        return (family, *dump(doc, rng.choice(["block", "flow", "json"])))
    if family == "text-mutation":
        name, text = rng.choice(CORPUS_TEXTS)
        muts = []
        for _ in range(rng.randrange(1, 5)):
            payload = (rng.choice(SNIPPETS) if rng.random() < 0.5 else
                       "".join(rng.choice(SYNTAX + "ab01") for _ in range(rng.randrange(1, 6))))
            muts.append((rng.choice(MUTATION_OPS), rng.randrange(1 << 20), rng.randrange(40), payload))
        return family, mutate_text(text, muts), name
    if family == "alias-bomb":
        return family, alias_bomb(rng.randrange(1, 11), rng.randrange(1, 21), rng.choice(BOMB_ELEMENTS),
                                  rng.choice(BOMB_PLACES)), "bomb.yaml"
    if family == "nesting-bomb":
        depth = rng.choice([1, 10, 63, 64, 65, 66, 100, 1000, 30000, rng.randrange(1, 100_000)])
        return (family, *nesting_bomb(rng.choice(NEST_KINDS), depth, rng.random() < 0.5,
                                      rng.random() < 0.5))
    tag, scalar = rng.choice(TAGS), rng.choice(SCALAR_TEXTS)
    quoted = f"'{scalar}'" if rng.random() < 0.3 else scalar
    field = rng.choice(["port", "protocol", "endPort", "x"])
    return (family, HEADER + f"  ingress: [{{toPorts: [{{ports: [{{{field}: {tag} {quoted}}}]}}]}}]\n",
            "tag.yaml")
