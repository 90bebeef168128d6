"""Flow filters with ``hubble observe`` semantics.

A filter is built from named criteria, each a list of values:

    FlowFilter.parse({"verdict": ["DROPPED"], "port": ["5432", "80"], "from_label": ["app=web"]})

The same criterion given several times matches when ANY of its values does (OR);
different criteria must ALL hold (AND). An empty or missing criterion matches
everything. ``since`` keeps flows at or after a time (RFC 3339, or a duration such as
``5m`` / ``1h30m`` meaning that long ago) and ``until`` at or before one; ``last``
keeps only the N newest matches, ``first`` the N oldest. ``not_KEY`` (every list key
below) excludes the flows that KEY's values would select (``hubble observe --not``).

Criteria:
    verdict      FORWARDED | DROPPED | AUDIT
    drop_reason  snake_case reason (policy_denied, spoofed, ...)
    direction    ingress | egress (relative to the endpoint whose hook saw it)
    protocol     tcp | udp | icmp (v4 and v6) | icmpv4 | icmpv6 | sctp | a number
    port         either port equals
    from_port, to_port
    identity     either side's identity number; from_identity, to_identity
    ip           either address is in the IP or CIDR; from_ip, to_ip
    label        either side's labels match the selector; from_label, to_label.
                 A selector is ``k=v,k2=v2`` (all must hold); ``k`` alone means the key
                 is present; a key may carry its source (``k8s:app=web``), else any
                 source matches; ``reserved:world`` selects the world identity.
    endpoint     either side's endpoint name; from_endpoint, to_endpoint
    type         l7 (HTTP requests and responses through the proxy), trace (other
                 forwarded or audited flows), drop (other dropped flows)
    http_method  the request's method (any case)
    http_path    a regular expression (RE2) found in the request target (path and query)
    http_host    the Host header (any case; without its port, the host name alone matches)
    http_status  a status code (``403``) or a class (``4+``: 400-499); responses only
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import re2

from ..datapath.maps import Verdict
from ..errors import InvalidRequest
from ..policy.api.selector import EndpointSelector
from ..policy.labels import LabelSet
from .record import (
    DADDR,
    DIRECTION,
    DPORT,
    DST_ID,
    DST_INFO,
    IP_VERSION,
    L7,
    PROTO,
    REASON,
    REASONS,
    RECORD,
    SADDR,
    SPORT,
    SRC_ID,
    SRC_INFO,
    TIME,
    VERDICT,
    VERDICTS,
)

TYPES = ("l7", "trace", "drop")


@dataclass(frozen=True)
class Criterion:
    """One list-valued filter, as the API names it; the CLI builds its flag from this
    (``--from-label``), the API document lists the same names (a test checks)."""

    key: str
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()     # the values it takes, in any case
    number: bool = False              # an integer (a port or an identity)


CRITERIA = (
    Criterion("verdict", "FORWARDED, DROPPED or AUDIT.", choices=tuple(VERDICTS.values())),
    Criterion("drop_reason", "policy_denied, spoofed, ..."),
    Criterion("direction", "ingress or egress (relative to the endpoint whose hook saw it).",
              choices=("ingress", "egress")),
    Criterion("protocol", "tcp, udp, icmp (v4 and v6), icmpv4, icmpv6, sctp or a number."),
    Criterion("port", "Source or destination port.", number=True),
    Criterion("from_port", "Source port.", number=True),
    Criterion("to_port", "Destination port.", number=True),
    Criterion("identity", "Identity of either side.", number=True),
    Criterion("from_identity", "Source identity.", number=True),
    Criterion("to_identity", "Destination identity.", number=True),
    Criterion("ip", "Address of either side.", "IP|CIDR"),
    Criterion("from_ip", "Source address.", "IP|CIDR"),
    Criterion("to_ip", "Destination address.", "IP|CIDR"),
    Criterion("label", "Labels of either side.", "K=V[,K=V]"),
    Criterion("from_label", "Source labels.", "K=V[,K=V]"),
    Criterion("to_label", "Destination labels.", "K=V[,K=V]"),
    Criterion("endpoint", "Endpoint of either side.", "NAME"),
    Criterion("from_endpoint", "Source endpoint.", "NAME"),
    Criterion("to_endpoint", "Destination endpoint.", "NAME"),
    Criterion("type", "l7: HTTP requests and responses through the proxy; trace, drop: the "
              "datapath's other flows.", choices=TYPES),
    Criterion("http_method", "HTTP method (L7 flows).", "METHOD"),
    Criterion("http_path", "RE2 expression found in the request target (path and query; L7 "
              "flows).", "REGEX"),
    Criterion("http_host", "Host header (L7 flows).", "HOST"),
    Criterion("http_status", "Status code (403) or class (4+) of L7 responses.", "CODE"),
)
LIST_KEYS = tuple(c.key for c in CRITERIA)
MAX_PATTERN = 1024
NOT_KEYS = tuple(f"not_{k}" for k in LIST_KEYS)
SCALAR_KEYS = ("since", "until", "last", "first")
KEYS = LIST_KEYS + NOT_KEYS + SCALAR_KEYS

_PROTOCOLS = {"tcp": {6}, "udp": {17}, "icmp": {1, 58}, "icmpv4": {1}, "icmpv6": {58},
              "sctp": {132}}
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")


def parse_time(text: str, now: float | None = None, field: str = "since") -> int:
    """RFC 3339 time or a duration ago -> wall-clock ns."""
    text = text.strip()
    m = _DURATION.match(text)
    if m and any(m.groups()):
        h, mi, s, ms = (int(g or 0) for g in m.groups())
        secs = h * 3600 + mi * 60 + s + ms / 1000
        return int(((time.time() if now is None else now) - secs) * 1e9)
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{field}: {text!r} is neither an RFC 3339 time nor a duration "
                             "like 30s, 5m, 1h", field) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return int(t.timestamp() * 1e9)


def _ports(values, where) -> set[int]:
    out = set()
    for v in values:
        try:
            p = int(v)
            if not 0 <= p <= 65535:
                raise ValueError
        except (TypeError, ValueError):
            raise InvalidRequest(f"{where}: {v!r} is not a port number", where) from None
        out.add(p)
    return out


def _ints(values, where) -> set[int]:
    try:
        return {int(v) for v in values}
    except (TypeError, ValueError):
        raise InvalidRequest(f"{where}: identities are numbers", where) from None


def _nets(values, where) -> list:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(str(v).strip(), strict=False))
        except ValueError:
            raise InvalidRequest(f"{where}: {v!r} is not an IP address or CIDR", where) from None
    return out


def _one_of(values, choices: dict, where: str, upper=False) -> set[int]:
    out = set()
    for v in values:
        key = str(v).upper() if upper else str(v).lower()
        if key not in choices:
            raise InvalidRequest(f"{where}: {v!r} is not one of {', '.join(choices)}", where)
        out.add(choices[key])
    return out


@dataclass
class FlowFilter:
    """Compiled criteria; ``match(row, infos)`` on a record row (see record.py)."""

    preds: list[Callable] = field(default_factory=list)
    since_ns: int | None = None
    until_ns: int | None = None
    last: int | None = None
    first: int | None = None
    criteria: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, criteria: dict) -> "FlowFilter":
        f = cls(criteria=dict(criteria))
        for k in criteria:
            if k not in KEYS:
                raise InvalidRequest(f"unknown flow filter {k!r} (known: {', '.join(KEYS)})", k)
        get = lambda k: [v for v in (criteria.get(k) or []) if v not in (None, "")]  # noqa: E731
        p = f.preds
        if get("verdict"):
            s = _one_of(get("verdict"), {n: v for v, n in VERDICTS.items()}, "verdict", upper=True)
            p.append(lambda r, i, s=s: r[VERDICT] in s)
        if get("drop_reason"):
            rs = _one_of(get("drop_reason"), {n: v for v, n in REASONS.items()}, "drop_reason")
            p.append(lambda r, i, rs=rs: r[VERDICT] != 0 and r[REASON] in rs)
        if get("direction"):
            ds = _one_of(get("direction"), {"ingress": 0, "egress": 1}, "direction")
            p.append(lambda r, i, ds=ds: r[DIRECTION] in ds)
        if get("protocol"):
            ps = set()
            for v in get("protocol"):
                v = str(v).lower()
                if v.isdigit():
                    ps.add(int(v))
                elif v in _PROTOCOLS:
                    ps |= _PROTOCOLS[v]
                else:
                    raise InvalidRequest(f"protocol: {v!r} is not one of {', '.join(_PROTOCOLS)} "
                                         "or a number", "protocol")
            p.append(lambda r, i, ps=ps: r[PROTO] in ps)
        for key, test in (("port", lambda r, s: r[SPORT] in s or r[DPORT] in s),
                          ("from_port", lambda r, s: r[SPORT] in s),
                          ("to_port", lambda r, s: r[DPORT] in s)):
            if get(key):
                s = _ports(get(key), key)
                p.append(lambda r, i, s=s, test=test: r[PROTO] not in (1, 58) and test(r, s))
        for key, sides in (("identity", (SRC_ID, DST_ID)), ("from_identity", (SRC_ID,)),
                           ("to_identity", (DST_ID,))):
            if get(key):
                s = _ints(get(key), key)
                p.append(lambda r, i, s=s, sides=sides: any(r[x] in s for x in sides))
        for key, sides in (("ip", (SADDR, DADDR)), ("from_ip", (SADDR,)), ("to_ip", (DADDR,))):
            if get(key):
                nets = _nets(get(key), key)
                p.append(lambda r, i, nets=nets, sides=sides: _ip_match(r, nets, sides))
        for key, sides in (("label", (SRC_INFO, DST_INFO)), ("from_label", (SRC_INFO,)),
                           ("to_label", (DST_INFO,))):
            if get(key):
                sels = [EndpointSelector.from_filter(str(v), key) for v in get(key)]
                p.append(_label_pred(sels, sides))
        for key, sides in (("endpoint", (SRC_INFO, DST_INFO)), ("from_endpoint", (SRC_INFO,)),
                           ("to_endpoint", (DST_INFO,))):
            if get(key):
                names = {str(v) for v in get(key)}
                p.append(lambda r, i, names=names, sides=sides:
                         any((i.values[r[x]] or (None,) * 4)[2] in names for x in sides))
        _l7_preds(get, p)
        for key in NOT_KEYS:
            if get(key):
                excluded = cls.parse({key[4:]: get(key)}).preds
                p.append(lambda r, i, ex=excluded: not all(q(r, i) for q in ex))
        since = criteria.get("since")
        if since not in (None, ""):
            f.since_ns = since if isinstance(since, int) else parse_time(str(since))
            p.insert(0, lambda r, i, t=f.since_ns: r[TIME] >= t)
        until = criteria.get("until")
        if until not in (None, ""):
            f.until_ns = until if isinstance(until, int) else parse_time(str(until), field="until")
            p.insert(0, lambda r, i, t=f.until_ns: r[TIME] <= t)
        for key in ("last", "first"):
            value = criteria.get(key)
            if value is not None and value != "":
                try:
                    n = int(value)
                    if n <= 0:
                        raise ValueError
                except (TypeError, ValueError):
                    raise InvalidRequest(f"{key}: {value!r} is not a positive number", key) from None
                setattr(f, key, n)
        if f.last is not None and f.first is not None:
            raise InvalidRequest("give first or last, not both", "first")
        return f

    def match(self, row: tuple, infos) -> bool:
        for pred in self.preds:
            if not pred(row, infos):
                return False
        return True

    def select(self, ring) -> list[tuple]:
        """Matching rows of ``ring``, oldest first, at most ``last`` (the newest) or
        ``first`` (the oldest)."""
        if self.first is not None:
            infos, preds, out = ring.infos, self.preds, []
            for r in RECORD.iter_unpack(ring.snapshot()):
                if self.until_ns is not None and r[TIME] > self.until_ns:
                    break
                if all(pred(r, infos) for pred in preds):
                    out.append(r)
                    if len(out) >= self.first:
                        break
            return out
        if self.last is None:
            infos, preds = ring.infos, self.preds
            if not preds:
                return ring.rows()
            return [r for r in RECORD.iter_unpack(ring.snapshot())
                    if all(p(r, infos) for p in preds)]
        out = []
        for r in ring.iter_rows_newest_first():
            if self.since_ns is not None and r[TIME] < self.since_ns:
                break
            if self.match(r, ring.infos):
                out.append(r)
                if len(out) >= self.last:
                    break
        out.reverse()
        return out


def _l7_preds(get, p: list) -> None:
    if get("type"):
        types = set()
        for v in get("type"):
            t = str(v).lower()
            if t not in TYPES:
                raise InvalidRequest(f"type: {v!r} is not one of {', '.join(TYPES)}", "type")
            types.add(t)
        dropped = int(Verdict.DROPPED)
        p.append(lambda r, i, ts=types: ("l7" if r[L7] else "drop" if r[VERDICT] == dropped
                                         else "trace") in ts)
    tests: list[Callable] = []
    if get("http_method"):
        methods = {str(v).upper() for v in get("http_method")}
        tests.append(lambda info, s=methods: info.method.upper() in s)
    if get("http_path"):
        pats = []
        for v in get("http_path"):
            if len(str(v)) > MAX_PATTERN:
                raise InvalidRequest(f"http_path: longer than {MAX_PATTERN} characters", "http_path")
            try:
                pats.append(re2.compile(str(v)))
            except re2.error as exc:
                raise InvalidRequest(f"http_path: {v!r} is not a regular expression (RE2): "
                                     f"{exc}", "http_path") from None
        tests.append(lambda info, pats=pats: any(x.search(info.path) for x in pats))
    if get("http_host"):
        hosts = {str(v).lower() for v in get("http_host")}
        tests.append(lambda info, s=hosts: info.host.lower() in s
                     or info.host.lower().rsplit(":", 1)[0] in s)
    if get("http_status"):
        codes: list[tuple[int, int]] = []
        for v in get("http_status"):
            m = re.fullmatch(r"([1-5])(?:\+|(\d\d))", str(v).strip())
            if not m:
                raise InvalidRequest(f"http_status: {v!r} is neither a status code (403) nor a "
                                     "class (4+)", "http_status")
            lo = int(m.group(1)) * 100 + (int(m.group(2)) if m.group(2) else 0)
            codes.append((lo, lo if m.group(2) else lo + 99))
        tests.append(lambda info, cs=codes: info.code != 0 and any(a <= info.code <= b
                                                                    for a, b in cs))
    if tests:
        def pred(r, i, tests=tests):
            table = getattr(i, "l7", None)
            info = table.get(r[L7]) if table is not None and r[L7] else None
            return info is not None and all(t(info) for t in tests)
        p.append(pred)


def _ip_match(row, nets, sides) -> bool:
    v = row[IP_VERSION]
    for x in sides:
        raw = row[x]
        addr = ipaddress.IPv6Address(raw) if v == 6 else ipaddress.IPv4Address(raw[:4])
        if any(addr.version == n.version and addr in n for n in nets):
            return True
    return False


def _label_pred(selectors, sides):
    cache: dict[int, bool] = {}

    def pred(row, infos):
        for x in sides:
            idx = row[x]
            hit = cache.get(idx)
            if hit is None:
                info = infos.values[idx]
                have = LabelSet.from_strings(info[1]) if info else LabelSet()
                hit = any(sel.matches(have) for sel in selectors)
                cache[idx] = hit
            if hit:
                return True
        return False
    return pred
