"""Policy tests: ``{from: SEL, to: SEL, port: 443/tcp, expect: allow|deny}`` cases,
checked against policy files (like Tailscale's ACL tests)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PolicyError, PolicyErrors, SelectorError
from .api.loader import load_data_file
from .api.rule import Policy
from .sel import PeerSpec, parse_port, parse_sel
from .trace import Tracer


@dataclass
class Case:
    index: int
    src: PeerSpec
    dst: PeerSpec
    port: str
    proto_num: int
    port_num: int
    expect: str


def parse_cases(data, name: str) -> list[Case]:
    if isinstance(data, dict) and "tests" in data:
        data = data["tests"]
    if not isinstance(data, list):
        raise PolicyErrors([PolicyError("", "a policy test file is a list of "
                                        "{from, to, port, expect} cases", file=name)])
    errors, cases = [], []
    for i, item in enumerate(data):
        path = f"[{i}]"
        if not isinstance(item, dict):
            errors.append(PolicyError(path, "must be a mapping", file=name))
            continue
        extra = set(item) - {"from", "to", "port", "expect", "name"}
        for key in sorted(extra):
            errors.append(PolicyError(f"{path}.{key}", "unknown field", file=name))
        for key in ("from", "to", "port", "expect"):
            if key not in item:
                errors.append(PolicyError(f"{path}.{key}", "is required", file=name))
        if any(k not in item for k in ("from", "to", "port", "expect")):
            continue
        try:
            src, dst = parse_sel(item["from"]), parse_sel(item["to"])
        except SelectorError as exc:
            errors.append(PolicyError(path, str(exc), file=name))
            continue
        try:
            proto, port = parse_port(item["port"])
        except SelectorError as exc:
            errors.append(PolicyError(f"{path}.port", str(exc), file=name))
            continue
        if item["expect"] not in ("allow", "deny"):
            errors.append(PolicyError(f"{path}.expect", "must be allow or deny", file=name))
            continue
        cases.append(Case(i, src, dst, str(item["port"]), proto, port, item["expect"]))
    if errors:
        raise PolicyErrors(errors)
    return cases


def load_cases(path: str | Path) -> list[Case]:
    return parse_cases(load_data_file(path), str(path))


def run_cases(cases: list[Case], policies: list[Policy], enforcement: str = "default") -> list[dict]:
    tracer = Tracer(policies, enforcement)
    results = []
    for case in cases:
        tr = tracer.trace(case.src, case.dst, case.proto_num, case.port_num)
        results.append({"index": case.index, "from": str(case.src), "to": str(case.dst),
                        "port": case.port, "expect": case.expect, "got": tr["verdict"],
                        "passed": tr["verdict"] == case.expect, "trace": tr})
    return results
