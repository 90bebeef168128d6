"""The rule lines a policy change adds and removes (policy/describe.py summarize): with
the agent's LineIndex (counts kept across changes) the same as by walking every policy,
over random sequences of changes where policies share lines (a line names its policy:
policies of two kinds with one name share them)."""
from __future__ import annotations

import random

import pytest

from stockade.policy.api.loader import load_text
from stockade.policy.describe import LineIndex, policy_lines, summarize
from stockade.policy.mapstate import Delta

pytestmark = pytest.mark.pure


def policy(name: str, peers: list[str], port: int, kind: str = "CiliumNetworkPolicy"):
    ingress = ", ".join(f"{{fromEndpoints: [{{matchLabels: {{app: {p}}}}}], "
                        f"toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]}}]}}" for p in peers)
    return load_text(f"apiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {{name: {name}}}\n"
                     f"spec:\n  endpointSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{ingress}]\n",
                     f"{name}.yaml")[0]


KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


def test_a_summary_with_the_line_index_is_the_summary_without_it():
    rnd, index, live, kept = random.Random(19), LineIndex(), {}, 0
    for step in range(200):
        new = dict(live)
        for _ in range(rnd.choice((1, 1, 2, 12))):
            name, kind = f"p{rnd.randrange(8)}", rnd.choice(KINDS)
            if rnd.random() < 0.25:
                new = {r: p for r, p in new.items() if (r.name, r.kind) != (name, kind)}
            else:          # the same name in both kinds, few peers and ports: lines shared
                p = policy(name, rnd.sample(["web", "api", "cache"], rnd.randint(1, 2)),
                           rnd.choice((80, 443)), kind)
                new[p.ref] = p
        walked = summarize(live, new, Delta())
        assert summarize(live, new, Delta(), index) == walked, step
        # the refs a change names: every one that differs, and some that do not
        named = [r for r in live.keys() | new.keys() if live.get(r) is not new.get(r) or rnd.random() < 0.3]
        assert summarize(live, new, Delta(), index, touched=named) == walked, step
        touched = [r for r in live.keys() | new.keys() if live.get(r) is not new.get(r)]
        lines = (policy_lines(live[r] for r in touched if r in live),
                 policy_lines(new[r] for r in touched if r in new))
        kept += len(lines[0] ^ lines[1]) > len(walked["rules"]["added"]) + len(walked["rules"]["removed"])
        if rnd.random() < 0.8:        # or discarded (a dry run, a failed write)
            live = new
    assert kept > 20      # changes whose lines another policy still has
