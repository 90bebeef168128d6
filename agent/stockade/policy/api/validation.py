"""Turn raw policy documents into sanitized ``Policy`` objects, or say exactly what is wrong.

Two passes, both collecting every error with its field path: the JSON Schema in
schema.json (structure, unknown and unsupported fields), then semantic checks (ports,
CIDRs, ``except`` inside its CIDR, label syntax, regexes). Normalization (protocol case,
port strings, ICMP names) happens as the sanitized types are built.
"""
from __future__ import annotations

import functools
import itertools
import json
import re
from importlib import resources
from typing import Any, Callable

import jsonschema
import re2

from ...errors import PolicyError, PolicyErrors
from ..labels import NAMESPACE_KEYS, Label, LabelSet, check_key, check_value, split_source
from .cidr import CIDRRule, inside, parse_network
from .entity import ENTITIES
from .ports import ICMP_FAMILIES, PROTOCOLS, HTTPRule, ICMPField, PortProtocol, PortRule
from .rule import CCNP, DIRECTION_FIELDS, PeerRule, Policy, PolicyRef, Rule, encode_document
from .selector import OPERATORS, EndpointSelector, Requirement

_SCHEMA = json.loads(resources.files(__package__).joinpath("schema.json").read_text())
_VALIDATOR = jsonschema.Draft202012Validator(_SCHEMA)

L7_SINGLE_TCP_PORT = "L7 HTTP rules need one TCP port (no port 0, endPort or UDP/SCTP)"
HEADER_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+(:.*)?$")


def render_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
_FAST_KEYWORDS = {"type", "properties", "additionalProperties", "required", "items", "not",
                  "x-stockade-unsupported", "$ref", "const", "enum", "minItems", "minLength",
                  "description", "title", "$schema", "$id", "$defs", "default"}


def _type_ok(doc: Any, types: list) -> bool:
    return any(isinstance(doc, _JSON_TYPES[t]) and not (t != "boolean" and isinstance(doc, bool))
               if t != "integer" else isinstance(doc, int) and not isinstance(doc, bool)
               for t in types)


_Check = Callable[[Any], "bool | None"]


def _compile_fast(schema: dict | bool, defs: dict[str, _Check]) -> _Check:
    """A check of schema.json's keywords that it uses, compiled once into closures:
    True (valid), False (invalid: jsonschema then explains why) or None (a keyword this
    check does not know: jsonschema decides)."""
    if schema is True or schema == {}:
        return lambda doc: True
    if schema is False:
        return lambda doc: False
    assert isinstance(schema, dict)
    if not _FAST_KEYWORDS.issuperset(schema):
        return lambda doc: None
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return lambda doc: defs[name](doc)   # defs is filled after every schema is compiled
    if "not" in schema:
        inner = _compile_fast(schema["not"], defs)

        def negated(doc):
            r = inner(doc)
            return None if r is None else not r
        return negated
    steps: list[_Check] = []
    if "const" in schema:
        const = schema["const"]
        steps.append(lambda doc: doc == const)
    if "enum" in schema:
        enum = schema["enum"]
        steps.append(lambda doc: doc in enum)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not {*_JSON_TYPES, "integer"}.issuperset(types):
            return lambda doc: None
        exact = {int if t == "integer" else _JSON_TYPES[t] for t in types}
        steps.append(lambda doc: type(doc) in exact or _type_ok(doc, types))
    min_length, min_items = schema.get("minLength", 0), schema.get("minItems", 0)
    if min_length:
        steps.append(lambda doc: not isinstance(doc, str) or len(doc) >= min_length)
    items = _compile_fast(schema["items"], defs) if "items" in schema else None
    if min_items or items:
        def check_list(doc):
            if not isinstance(doc, list):
                return True
            if len(doc) < min_items:
                return False
            if items is not None:
                for item in doc:
                    r = items(item)
                    if not r:
                        return r
            return True
        steps.append(check_list)
    required = tuple(schema.get("required", ()))
    props = {k: _compile_fast(v, defs) for k, v in schema.get("properties", {}).items()}
    extra = _compile_fast(schema.get("additionalProperties", True), defs)
    if required or props or "additionalProperties" in schema:
        def check_map(doc):
            if not isinstance(doc, dict):
                return True
            for k in required:
                if k not in doc:
                    return False
            for k, v in doc.items():
                r = props.get(k, extra)(v)
                if not r:
                    return r
            return True
        steps.append(check_map)

    def check(doc):
        for step in steps:
            r = step(doc)
            if not r:
                return r
        return True
    return check


def _compile_schema(schema: dict) -> _Check:
    defs: dict[str, _Check] = {}
    for name, sub in schema.get("$defs", {}).items():
        defs[name] = _compile_fast(sub, defs)
    return _compile_fast(schema, defs)


_FAST_CHECK = _compile_schema(_SCHEMA)


def _fast_valid(doc: Any, schema: dict = _SCHEMA) -> bool | None:
    """``doc`` checked by the compiled ``schema`` (schema.json's is compiled once)."""
    return (_FAST_CHECK if schema is _SCHEMA else _compile_schema(schema))(doc)


MAX_SCHEMA_ERRORS = 100  # per document: the first ones found (each costs ~30 us)


def schema_errors(doc: Any) -> list[PolicyError]:
    if _fast_valid(doc, _SCHEMA):
        return []
    errors = []
    found = itertools.islice(_VALIDATOR.iter_errors(doc), MAX_SCHEMA_ERRORS)
    for err in sorted(found, key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = set(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - allowed):
                errors.append(PolicyError(render_path(path + [extra]), "unknown field"))
        elif err.validator == "not" and err.schema.get("x-stockade-unsupported"):
            errors.append(PolicyError(render_path(path),
                                      f"{path[-1]} is not supported by Stockade"))
        elif err.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", err.message)
            name = missing[0] if missing else "field"
            errors.append(PolicyError(render_path(path + [name]), "is required"))
        elif err.validator == "type":
            errors.append(PolicyError(render_path(path),
                                      f"must be of type {_types(err.validator_value)}, "
                                      f"not {type(err.instance).__name__}"))
        else:
            errors.append(PolicyError(render_path(path), err.message))
    return errors


def _types(value) -> str:
    return " or ".join(value) if isinstance(value, list) else str(value)


# Peer fields of one rule element, by direction, with the names Cilium's rule validation
# uses in its messages. Cilium refuses to combine two of them in one element.
PEER_FIELDS = {
    "from": (("fromEndpoints", "FromEndpoints"), ("fromCIDR", "FromCIDR"),
             ("fromCIDRSet", "FromCIDRSet"), ("fromEntities", "FromEntities")),
    "to": (("toEndpoints", "ToEndpoints"), ("toCIDR", "ToCIDR"),
           ("toCIDRSet", "ToCIDRSet"), ("toEntities", "ToEntities")),
}
ICMPS_WITH_TOPORTS = ("The ICMPs block may only be present without ToPorts. "
                      "Define a separate rule to use ToPorts.")


class _Sanitizer:
    """Builds sanitized types from a schema-valid document, collecting every error.

    ``strict=False`` is for documents an earlier version accepted (the agent's stored
    policies): shapes this version refuses but can still compile as that version did
    are collected in ``problems`` instead of ``errors``.
    """

    def __init__(self, namespace: str, strict: bool = True):
        self.namespace = namespace
        self.strict = strict
        self.errors: list[PolicyError] = []
        self.problems: list[PolicyError] = []
        self.has_l7 = False

    def fail(self, path: str, msg: str) -> None:
        self.errors.append(PolicyError(path, msg))

    def refuse(self, path: str, msg: str) -> None:
        """A shape this version refuses that an earlier one accepted and compiled."""
        (self.errors if self.strict else self.problems).append(PolicyError(path, msg))

    # selectors -----------------------------------------------------------------
    def selector(self, raw: dict, path: str, *, peer: bool) -> EndpointSelector:
        labels = {}
        for key, value in (raw.get("matchLabels") or {}).items():
            value = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            why = check_key(key) or check_value(value, split_source(key)[0])
            if why:
                self.fail(f"{path}.matchLabels.{key}", why)
            labels[key] = value
        exprs = []
        for i, expr in enumerate(raw.get("matchExpressions") or []):
            epath = f"{path}.matchExpressions[{i}]"
            key, op, values = expr["key"], expr["operator"], expr.get("values") or []
            why = check_key(key)
            if why:
                self.fail(f"{epath}.key", why)
            if op not in OPERATORS:
                self.fail(f"{epath}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}")
            elif op in ("In", "NotIn") and not values:
                self.fail(f"{epath}.values", f"operator {op} needs at least one value")
            elif op in ("Exists", "DoesNotExist") and values:
                self.fail(f"{epath}.values", f"operator {op} takes no values")
            for j, v in enumerate(values):
                why = check_value(v, split_source(key)[0])
                if why:
                    self.fail(f"{epath}.values[{j}]", why)
            exprs.append((key, op, values))
        sel = EndpointSelector.build(labels, exprs)
        if not self.namespace:
            return sel
        own = Requirement("any", "namespace", "In", (self.namespace,))
        if peer:
            # A peer selector that names a namespace (either key) may reach across
            # namespaces; one that names a reserved identity is not namespaced at all.
            return sel if sel.names_namespace or sel.names_reserved else sel.with_requirement(own)
        # A namespaced policy selects only its own namespace's workloads.
        own_ns = LabelSet([Label("any", "namespace", self.namespace)])
        other = [r for r in sel.requirements if r.key in NAMESPACE_KEYS and not r.matches(own_ns)]
        if other:
            self.refuse(path, f"a policy in namespace {self.namespace} selects only workloads "
                              f"of that namespace; {other[0].describe()} names another "
                              "(use a CiliumClusterwideNetworkPolicy)")
            if not self.strict:
                return sel  # as the version that stored it compiled it
        return sel.with_requirement(own)

    # peers ---------------------------------------------------------------------
    def cidr(self, text: str, path: str):
        try:
            return parse_network(text)
        except ValueError as exc:
            self.fail(path, f"{text!r} is not a valid CIDR ({exc})")
            return None

    def cidr_set(self, raw: dict, path: str) -> CIDRRule | None:
        if "cidrGroupRef" in raw:
            ref = raw["cidrGroupRef"]
            if set(raw) - {"cidrGroupRef"}:
                self.fail(path, "cidrGroupRef cannot be combined with cidr or except")
                return None
            if not re.match(r"^[a-z0-9]([a-z0-9\-.]{0,61}[a-z0-9])?$", ref):
                self.fail(f"{path}.cidrGroupRef", f"{ref!r} is not a service name")
                return None
            return CIDRRule(None, (), ref)
        if "cidr" not in raw:
            self.fail(f"{path}.cidr", "is required")
            return None
        net = self.cidr(raw["cidr"], f"{path}.cidr")
        excepts = []
        for i, text in enumerate(raw.get("except") or []):
            ex = self.cidr(text, f"{path}.except[{i}]")
            if ex is None or net is None:
                continue
            if not inside(ex, net):
                self.fail(f"{path}.except[{i}]", f"{ex} is not inside {net}")
                continue
            excepts.append(ex)
        return CIDRRule(net, tuple(sorted(excepts, key=_net_key))) if net is not None else None

    def peer_rule(self, raw: dict, path: str, *, ingress: bool, deny: bool) -> PeerRule:
        pre = "from" if ingress else "to"
        given = [(fld, go) for fld, go in PEER_FIELDS[pre] if raw.get(fld)]
        if len(given) > 1:
            self.refuse(path, f"Combining {given[0][1]} and {given[1][1]} is not supported yet")
        if raw.get("icmps") and raw.get("toPorts"):
            self.refuse(path, ICMPS_WITH_TOPORTS)
        empty = tuple(fld for fld, _ in PEER_FIELDS[pre] if raw.get(fld, None) == [])
        endpoints = tuple(self.selector(s, f"{path}.{pre}Endpoints[{i}]", peer=True)
                          for i, s in enumerate(raw.get(f"{pre}Endpoints") or []))
        cidrs = []
        for i, text in enumerate(raw.get(f"{pre}CIDR") or []):
            net = self.cidr(text, f"{path}.{pre}CIDR[{i}]")
            if net is not None:
                cidrs.append(CIDRRule(net))
        for i, cs in enumerate(raw.get(f"{pre}CIDRSet") or []):
            rule = self.cidr_set(cs, f"{path}.{pre}CIDRSet[{i}]")
            if rule is not None:
                cidrs.append(rule)
        entities = []
        for i, ent in enumerate(raw.get(f"{pre}Entities") or []):
            if ent not in ENTITIES:
                self.fail(f"{path}.{pre}Entities[{i}]",
                          f"entity {ent!r} is not supported (one of {', '.join(ENTITIES)})")
            else:
                entities.append(ent)
        to_ports = tuple(self.port_rule(pr, f"{path}.toPorts[{i}]", deny=deny)
                         for i, pr in enumerate(raw.get("toPorts") or []))
        icmps = tuple(f for i, ic in enumerate(raw.get("icmps") or [])
                      for f in self.icmp_rule(ic, f"{path}.icmps[{i}]"))
        return PeerRule(path, endpoints, tuple(cidrs), tuple(sorted(set(entities))),
                        to_ports, icmps, empty)

    # L4 ------------------------------------------------------------------------
    def port_rule(self, raw: dict, path: str, *, deny: bool) -> PortRule:
        ports, indexes = [], []
        for i, p in enumerate(raw.get("ports") or []):
            pp = _plain_port(p) or self.port(p, f"{path}.ports[{i}]")
            if pp:
                ports.append(pp)
                indexes.append(i)
        if not raw.get("ports"):
            self.fail(f"{path}.ports", "at least one port is required")
        http: tuple[HTTPRule, ...] = ()
        rules = raw.get("rules") or {}
        if "http" in rules:
            if deny:
                self.fail(f"{path}.rules", "deny rules cannot have L7 rules")
            http = tuple(self.http_rule(h, f"{path}.rules.http[{i}]")
                         for i, h in enumerate(rules["http"]))
            if not http:
                http = (HTTPRule(),)  # ``http: []``: as ``[{}]``, every request (visibility)
            for i, pp in zip(indexes, ports, strict=True):
                if pp.port == 0 or pp.end_port or pp.protocol not in ("TCP", "ANY"):
                    self.fail(f"{path}.ports[{i}]", L7_SINGLE_TCP_PORT)
            self.has_l7 = True
        return PortRule(tuple(ports), http)

    def port(self, raw: dict, path: str) -> PortProtocol | None:
        """A port of toPorts, or None and an error (``_plain_port`` is the common case's
        shortcut: it gives the same PortProtocol)."""
        proto = str(raw.get("protocol", "ANY")).upper()
        ok = True
        if proto not in PROTOCOLS:
            self.fail(f"{path}.protocol", f"{raw.get('protocol')!r} is not one of TCP, UDP, SCTP, ANY")
            ok = False
        port_raw = raw.get("port", 0)
        if isinstance(port_raw, str):
            if not (port_raw.isascii() and port_raw.isdigit()):
                self.fail(f"{path}.port", f"{port_raw!r} is not a port number "
                                          "(named ports are not supported)")
                return None
            port_raw = int(port_raw)
        if not 0 <= port_raw <= 65535:
            self.fail(f"{path}.port", f"{port_raw} is not a port number (0-65535)")
            return None
        end = raw.get("endPort")
        if end is not None:
            if not 0 < end <= 65535:
                self.fail(f"{path}.endPort", f"{end} is not a port number (1-65535)")
                return None
            if port_raw == 0:
                self.fail(f"{path}.endPort", "endPort needs a non-zero port")
                return None
            if end < port_raw:
                self.fail(f"{path}.endPort", f"endPort {end} is below port {port_raw}")
                return None
            if end == port_raw:
                end = None
        return _port_protocol(port_raw, end, proto) if ok else None

    def http_rule(self, raw: dict, path: str) -> HTTPRule:
        for name in ("method", "path", "host"):
            if name in raw:
                why = l7_pattern_error(raw[name])
                if why:
                    self.fail(f"{path}.{name}", why)
        for i, header in enumerate(raw.get("headers") or []):
            if not HEADER_RE.match(header) or any(c in header for c in "\r\n\0"):
                self.fail(f"{path}.headers[{i}]", f"{header!r} is not a valid header")
        return HTTPRule(raw.get("method"), raw.get("path"), raw.get("host"),
                        tuple(raw.get("headers") or ()))

    def icmp_rule(self, raw: dict, path: str) -> list[ICMPField]:
        out = []
        for i, f in enumerate(raw.get("fields") or []):
            fpath = f"{path}.fields[{i}]"
            family = f.get("family", "IPv4")
            if family not in ICMP_FAMILIES:
                self.fail(f"{fpath}.family", f"{family!r} is not IPv4 or IPv6")
                continue
            names = ICMP_FAMILIES[family][1]
            typ = f["type"]
            if isinstance(typ, str) and not (typ.isascii() and typ.isdigit()):
                if typ not in names:
                    self.fail(f"{fpath}.type", f"{typ!r} is not a known {family} ICMP type name")
                    continue
                typ = names[typ]
            typ = int(typ)
            if not 0 <= typ <= 255:
                self.fail(f"{fpath}.type", f"{typ} is not an ICMP type (0-255)")
                continue
            out.append(ICMPField(family, typ))
        return out

    # spec ----------------------------------------------------------------------
    def spec(self, raw: dict, ref: PolicyRef, path: str) -> Rule:
        sel = self.selector(raw["endpointSelector"], f"{path}.endpointSelector", peer=False)
        lists = {}
        for fld in DIRECTION_FIELDS:
            ingress = fld.startswith("ingress")
            lists[fld] = tuple(self.peer_rule(pr, f"{path}.{fld}[{i}]", ingress=ingress,
                                              deny=fld.endswith("Deny"))
                               for i, pr in enumerate(raw.get(fld) or []))
        dd = raw.get("enableDefaultDeny") or {}
        labels = tuple(f"{l.get('source', 'unspec')}:{l['key']}={l.get('value', '')}"
                       for l in raw.get("labels") or [])
        return Rule(ref, path, sel, lists["ingress"], lists["egress"], lists["ingressDeny"],
                    lists["egressDeny"], dd.get("ingress"), dd.get("egress"),
                    raw.get("description", ""), labels)


@functools.lru_cache(maxsize=4096)
def _port_protocol(port: int, end: int | None, proto: str) -> PortProtocol:
    """One shared object per port, range and protocol (100,000 ports are a few hundred)."""
    return PortProtocol(port, end, proto)


_PLAIN_PROTOCOLS = {p: p for p in PROTOCOLS} | {p.lower(): p for p in PROTOCOLS}


def _plain_port(raw: dict) -> PortProtocol | None:
    """``{port: "N", protocol: P}`` (N a decimal port, P a protocol in upper or lower
    case), ``port`` alone or ``protocol`` alone: its PortProtocol; None for anything
    else (``port`` then checks it and says what is wrong)."""
    if len(raw) > 2 or not (raw.keys() <= {"port", "protocol"}):
        return None
    proto = raw.get("protocol", "ANY")
    proto = _PLAIN_PROTOCOLS.get(proto) if type(proto) is str else None
    port = raw.get("port", 0)
    if proto is None:
        return None
    if type(port) is str:
        if not (len(port) <= 5 and port.isascii() and port.isdigit()):
            return None
        port = int(port)
    elif type(port) is not int:
        return None
    return _port_protocol(port, None, proto) if 0 <= port <= 65535 else None


def _net_key(n):
    return (n.version, n.network_address, n.prefixlen)


MAX_L7_PATTERN = 1024  # characters


def l7_pattern_error(pattern: str) -> str | None:
    """Why an HTTP rule pattern is refused, or None. Patterns must be RE2 syntax (no
    backreferences, no lookaround) so that they match in linear time, in the agent's
    checks (google-re2) and, bounded by a match limit, in the proxy's PCRE2."""
    if len(pattern) > MAX_L7_PATTERN:
        return f"regular expression longer than {MAX_L7_PATTERN} characters"
    if any(c in pattern for c in "\r\n\0"):
        return "regular expression contains a control character (CR, LF or NUL)"
    try:
        re2.compile(pattern)
    except re2.error as exc:
        why = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return f"invalid regular expression (RE2 syntax): {why}"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression: {exc}"
    return None


def sanitize_document(doc: Any, *, source: str = "", strict: bool = True) -> Policy:
    """One raw document -> Policy, or PolicyErrors with every problem (paths only; the
    caller adds file and document).

    ``strict=False`` reads a document that an earlier version accepted: shapes this
    version refuses (see ``_Sanitizer.refuse``) are compiled as before and listed in
    ``Policy.problems``; everything else is checked as usual."""
    errors = schema_errors(doc)
    if errors:
        raise PolicyErrors(errors)
    meta = doc["metadata"]
    kind = doc["kind"]
    namespace = meta.get("namespace") or ""
    if kind == CCNP and namespace:
        raise PolicyErrors([PolicyError("metadata.namespace",
                                        "CiliumClusterwideNetworkPolicy is not namespaced")])
    if "spec" not in doc and "specs" not in doc:
        raise PolicyErrors([PolicyError("spec", "is required (or specs)")])
    ref = PolicyRef(kind, namespace, meta["name"])
    s = _Sanitizer(namespace, strict)
    for field_, text in (("metadata.name", meta["name"]), ("metadata.namespace", namespace)):
        if text and not re.match(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", text):
            s.fail(field_, f"{text!r} must be lower-case letters, digits, '-' and '.'")
    specs = []
    if "spec" in doc:
        specs.append(("spec", doc["spec"]))
    for i, sp in enumerate(doc.get("specs") or []):
        specs.append((f"specs[{i}]", sp))
    rules = [s.spec(raw, ref, path) for path, raw in specs]
    if s.errors:
        raise PolicyErrors(s.errors)
    return Policy(ref, rules, source, encode_document(doc), s.has_l7, doc.get("description", ""),
                  tuple(str(e) for e in s.problems))
