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

from collections.abc import Iterable

from ..policy.api.ports import HTTPRule

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


def sort_rules(rules: Iterable[HTTPRule]) -> list[HTTPRule]:
    """A stable order (slots are positions): same set, same slots."""
    return sorted(rules, key=lambda r: (r.method or "", r.path or "", r.host or "", r.headers))
