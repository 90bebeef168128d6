"""Policy tests: ``{from: SEL, to: SEL, port: 443/tcp, expect: allow|deny}`` cases,
checked against policy files (like Tailscale's ACL tests). A case on a TCP port may give
``http: {method, path, host, headers}``: one request on that connection, which the trace
also puts through the port's HTTP rules (the proxy's verdict)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PolicyError, PolicyErrors, SelectorError
from ..l7.rules import HTTPRequest, http_request, request_problems
from .api.loader import load_data_file
from .api.rule import Policy
from .mapstate import PROTO_TCP
from .sel import PeerSpec, parse_port, parse_sel
from .trace import Tracer

CASE_FIELDS = ("from", "to", "port", "expect", "name", "http")
REQUIRED = ("from", "to", "port", "expect")
HTTP_FIELDS = ("method", "path", "host", "headers")


@dataclass
class Case:
    index: int
    src: PeerSpec
    dst: PeerSpec
    port: str
    proto_num: int
    port_num: int
    expect: str
    http: HTTPRequest | None = None


def parse_cases(data, name: str) -> list[Case]:
    if isinstance(data, dict) and "tests" in data:
        data = data["tests"]
    if not isinstance(data, list):
        raise PolicyErrors([PolicyError("", "a policy test file is a list of "
                                        "{from, to, port, expect} cases", file=name)])
    errors: list[PolicyError] = []
    cases = []
    for i, item in enumerate(data):
        path = f"[{i}]"
        if not isinstance(item, dict):
            errors.append(PolicyError(path, "must be a mapping", file=name))
            continue
        extra = set(map(str, item)) - set(CASE_FIELDS)
        for key in sorted(extra):
            errors.append(PolicyError(f"{path}.{key}", "unknown field", file=name))
        for key in REQUIRED:
            if key not in item:
                errors.append(PolicyError(f"{path}.{key}", "is required", file=name))
        if any(k not in item for k in REQUIRED):
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
        http = None
        if "http" in item:
            problems = _http_problems(item["http"], f"{path}.http")
            if not problems and proto != PROTO_TCP:
                problems = [(f"{path}.http", f"an HTTP request needs a TCP port, not {item['port']}")]
            if problems:
                errors.extend(PolicyError(p, msg, file=name) for p, msg in problems)
                continue
            http = _request(item["http"])
        cases.append(Case(i, src, dst, str(item["port"]), proto, port, item["expect"], http))
    if errors:
        raise PolicyErrors(errors)
    return cases


def _http_problems(http, path: str) -> list[tuple[str, str]]:
    """(field path, message) for each thing wrong with a case's ``http`` part."""
    if not isinstance(http, dict):
        return [(path, "must be a mapping of method, path, host, headers")]
    out = [(f"{path}.{k}", "unknown field (method, path, host, headers)")
           for k in sorted(set(map(str, http)) - set(HTTP_FIELDS))]
    return out + [(f"{path}.{e.field}", e.message) for e in request_problems(
        http.get("method"), http.get("path"), http.get("host"), http.get("headers"))]


def _request(http: dict) -> HTTPRequest:
    req = http_request(http.get("method"), http.get("path"), http.get("host"),
                       http.get("headers") or ())
    return req if req is not None else HTTPRequest()   # `http: {}`: GET / as the default


def load_cases(path: str | Path) -> list[Case]:
    return parse_cases(load_data_file(path), str(path))


def request_dict(req: HTTPRequest) -> dict:
    return {"method": req.method, "path": req.path, "host": req.host,
            "headers": [f"{k}: {v}" if v else k for k, v in req.headers]}


def run_cases(cases: list[Case], policies: list[Policy], enforcement: str = "default") -> list[dict]:
    tracer = Tracer(policies, enforcement)
    results = []
    for case in cases:
        tr = tracer.trace(case.src, case.dst, case.proto_num, case.port_num, case.http)
        result = {"index": case.index, "from": str(case.src), "to": str(case.dst),
                  "port": case.port, "expect": case.expect, "got": tr["verdict"],
                  "passed": tr["verdict"] == case.expect, "trace": tr}
        if case.http is not None:
            result["http"] = request_dict(case.http)
        results.append(result)
    return results
