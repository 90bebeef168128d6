"""HTTP rules as the proxy matches them.

The proxy (HAProxy) evaluates each request against ``slots`` rule positions. For a
request it builds, per field, the sample ``<rule set>~<value>``: ``value`` is the
method, the Host header, the request target as sent (path and query) or the whole
header block. Each slot has one map per field whose keys are regular expressions
(``map_reg``); rule ``i`` of rule set ``R`` is the key ``^R~(?:<pattern>)$`` of the
field maps of slot ``i``. A request passes when every field of some slot matches. A
field the rule does not give is the key ``^R~`` (anything). The rule set number makes
keys of different rule sets disjoint, so one map holds every rule set's rule ``i``.

Every key starts with ``(*LIMIT_MATCH=n)``: PCRE2 (HAProxy's engine) backtracks, and a
pattern such as ``(a+)+$`` is RE2 syntax yet exponential there; past the limit the match
fails, so the request is refused (closed), and the proxy never stalls on it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import re2

from ..policy.api.ports import HTTPRule
from ..policy.mapstate import ANY_PEER, INGRESS, L7Key

FIELDS = ("method", "path", "host", "headers")
DEFAULT_MATCH_LIMIT = 100_000


def _pcre_literal(text: str) -> str:
    """``text`` matched literally by PCRE2 (every non-alphanumeric escaped as \\xHH, so
    that no map or CLI parser sees a space or a backslash it could interpret)."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text)


def _pattern(pattern: str) -> str:
    """A user pattern (RE2 syntax, checked at validation) with the characters that the
    map file and CLI parsers split or unescape on written as escapes PCRE2 reads."""
    return pattern.replace(" ", "\\x20").replace("\t", "\\t")


def header_regex(headers: Iterable[str]) -> str:
    """Lookaheads over the header block (``name: value\\r\\n`` lines, names in lower
    case as HAProxy keeps them): each ``Name`` must be present, each ``Name: value``
    present with exactly that value."""
    parts = []
    for h in headers:
        name, sep, value = h.partition(":")
        line = _pcre_literal(name.strip().lower() + ":")
        if sep:
            line += "\\x20*" + _pcre_literal(value.strip()) + "\\x20*\\r\\n"
        parts.append(f"(?=(?:[^\\n]*\\n)*?{line})")
    return "".join(parts)


def rule_keys(rs: int, rule: HTTPRule, limit: int = DEFAULT_MATCH_LIMIT) -> dict[str, str]:
    """Field -> map key (a regular expression) of ``rule`` in rule set ``rs``."""
    head = f"(*LIMIT_MATCH={limit})^{rs}~"
    out = {}
    for field, pattern in (("method", rule.method), ("path", rule.path), ("host", rule.host)):
        out[field] = head + (f"(?:{_pattern(pattern)})$" if pattern is not None else "")
    out["headers"] = head + header_regex(rule.headers)
    return out


class RuleSets:
    """Rule set numbers: one per (HTTP rules, policies behind them), never reused while
    the agent runs. The proxy logs the number it applied with each request, so an L7 flow
    names the policies that decided it at the time, whatever changed since (as the
    datapath's policy_ids do for L3/L4). The table grows with new combinations of rules
    and policies, not with keys or traffic."""

    def __init__(self) -> None:
        self._numbers: dict[tuple[frozenset, tuple[str, ...]], int] = {}
        self._policies: dict[int, tuple[str, ...]] = {}

    def number(self, rules: frozenset, policies: tuple[str, ...]) -> int:
        n = self._numbers.get((rules, policies))
        if n is None:
            n = self._numbers[(rules, policies)] = len(self._numbers) + 1
            self._policies[n] = policies
        return n

    def policies(self, number: int | None) -> tuple[str, ...]:
        """The policies behind rule set ``number`` (none: no rule set applied)."""
        return self._policies.get(number, ()) if number is not None else ()


def sort_rules(rules: Iterable[HTTPRule]) -> list[HTTPRule]:
    """A stable order (slots are positions): same set, same slots."""
    return sorted(rules, key=lambda r: (r.method or "", r.path or "", r.host or "", r.headers))


# ---------------------------------------------------------------------- the same rules in Python
# ``policy trace`` asks what the proxy would do with one request: the rule sets it looks up
# are the compiled ones (PolicyEngine.l7, as L7Proxy.desired maps them), matched here with
# RE2 with the semantics of the keys above: whole-value matches, header names in any case.

@dataclass(frozen=True)
class HTTPRequest:
    method: str = "GET"
    path: str = "/"                       # the request target as sent: path and query
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()   # (name, value)

    def header_lines(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, value in self.headers:
            out.setdefault(name.strip().lower(), []).append(value.strip())
        if self.host and "host" not in out:
            out["host"] = [self.host]
        return out


def _full(pattern: str | None, value: str) -> bool:
    return pattern is None or re2.fullmatch(pattern, value) is not None


def rule_matches(rule: HTTPRule, req: HTTPRequest) -> bool:
    if not (_full(rule.method, req.method) and _full(rule.path, req.path)
            and _full(rule.host, req.host)):
        return False
    have = req.header_lines()
    for h in rule.headers:
        name, sep, value = h.partition(":")
        values = have.get(name.strip().lower())
        if values is None or (sep and value.strip() not in values):
            return False
    return True


def rules_for(l7: Mapping[L7Key, frozenset], local: int, port: int, peer: int,
              direction: int = INGRESS) -> frozenset | None:
    """The rule set the proxy applies to ``peer`` -> ``local``:``port`` (INGRESS) or
    to ``local`` -> ``peer``:``port`` (EGRESS) (its lookup: the peer's own entry, else
    the any-peer one); None: the port is not L7 for it."""
    rules = l7.get(L7Key(local, direction, port, peer))
    return rules if rules is not None else l7.get(L7Key(local, direction, port, ANY_PEER))


def first_match(rules: Iterable[HTTPRule], req: HTTPRequest) -> HTTPRule | None:
    return next((r for r in sort_rules(rules) if rule_matches(r, req)), None)


def rule_dict(rule: HTTPRule) -> dict:
    """A rule as policies write it (fields it gives only)."""
    out: dict = {k: v for k, v in (("method", rule.method), ("path", rule.path),
                                   ("host", rule.host)) if v is not None}
    if rule.headers:
        out["headers"] = list(rule.headers)
    return out


# What an HTTP/1.1 request line and header block can carry (RFC 9110 tokens, no
# whitespace or control characters in the target or the host), within HAProxy's limits.
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
NO_SPACE = re.compile(r"[\x21-\x7e\xa0-\ud7ff\ue000-\U0010ffff]+")
VALUE = re.compile(r"[\t\x20-\x7e\xa0-\ud7ff\ue000-\U0010ffff]*")
MAX_LEN = {"method": 64, "path": 8192, "host": 1024, "headers": 8192}
MAX_HEADERS = 100
_SHAPES = (("method", TOKEN, "an HTTP method token (GET, POST, ...)"),
           ("path", NO_SPACE, "the request target as sent, without spaces or control "
            "characters (/api/x?q=1)"),
           ("host", re.compile(f"(?:{NO_SPACE.pattern})?"),    # "": no Host header
            "a Host header value, without spaces or control characters"))


class RequestError(ValueError):
    """A request a trace cannot ask about; ``field``: method, path, host, headers[i]."""

    def __init__(self, field: str, message: str):
        super().__init__(f"http {field}: {message}")
        self.field, self.message = field, message


def request_problems(method=None, path=None, host=None, headers=None) -> list[RequestError]:
    """What is wrong with a request's parts (None: not given), whatever their types:
    the policy test files' cases, the CLI's flags and the API's parameters alike."""
    out = []
    for (field, pattern, what), value in zip(_SHAPES, (method, path, host), strict=True):
        if value is None:
            continue
        if not isinstance(value, str):
            out.append(RequestError(field, f"must be a string: {what}"))
        elif len(value) > MAX_LEN[field]:
            out.append(RequestError(field, f"longer than {MAX_LEN[field]} characters"))
        elif not pattern.fullmatch(value):
            out.append(RequestError(field, f"must be {what}"))
    if headers is not None:
        if not isinstance(headers, (list, tuple)):
            out.append(RequestError("headers", "must be a list of 'Name' or 'Name: value'"))
        elif len(headers) > MAX_HEADERS:
            out.append(RequestError("headers", f"at most {MAX_HEADERS} headers"))
        else:
            out += [e for j, h in enumerate(headers) if (e := _header_problem(h, j))]
    return out


def _header_problem(h, j: int) -> RequestError | None:
    field = f"headers[{j}]"
    if isinstance(h, dict):
        return RequestError(field, "must be a string 'Name' or 'Name: value' (quote it in "
                            "YAML: \"X-Token: s3cret\")")
    if not isinstance(h, str):
        return RequestError(field, "must be a string 'Name' or 'Name: value'")
    if len(h) > MAX_LEN["headers"]:
        return RequestError(field, f"longer than {MAX_LEN['headers']} characters")
    name, _sep, value = h.partition(":")
    if not TOKEN.fullmatch(name.strip()):
        return RequestError(field, "the header name must be a token (X-Token), before an "
                            "optional ': value'")
    if not VALUE.fullmatch(value):
        return RequestError(field, "the header value must not hold control characters")
    return None


def http_request(method: str | None = None, path: str | None = None, host: str | None = None,
                 headers: Iterable[str] = ()) -> HTTPRequest | None:
    """The request a trace asks about (None when it gives no HTTP part). Missing parts
    default to GET, / and no Host; ``headers`` are ``Name: value`` (or ``Name``).
    Raises RequestError (the first of ``request_problems``)."""
    headers = list(headers or ())
    if method is None and path is None and host is None and not headers:
        return None
    problems = request_problems(method, path, host, headers)
    if problems:
        raise problems[0]
    hdrs = []
    for h in headers:
        name, _sep, value = h.partition(":")
        hdrs.append((name.strip(), value.strip()))
    return HTTPRequest(method=method or "GET", path=path or "/", host=host or "",
                       headers=tuple(hdrs))
