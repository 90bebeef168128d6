"""Request validation against the agent's OpenAPI document (docs/api/openapi.yaml).

The document is the one description of every request body and query parameter; it
ships in the package as ``stockade/daemon/openapi.yaml`` (a link to docs/api/ in the
source tree). ``ApiSchema`` reads it once and gives each operation an ``Operation``:
an OAS 3.0 validator for its body (openapi-schema-validator's OAS30Validator, a
jsonschema validator that knows ``nullable``) and one per query parameter, which
``query()`` first converts from text as the parameter's schema says.

Errors are InvalidRequest, with ``field`` the key path of the offence (``files[0].text``,
``labels.app``, or the query parameter) and a message that says what was expected. Of
several problems, the one jsonschema's ``best_match`` finds most relevant is reported.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from jsonschema.exceptions import ValidationError, best_match
from openapi_schema_validator import OAS30Validator

from ..errors import InvalidRequest

JSON_TYPE = "application/json"
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_TYPE_NAMES = {"string": "a string", "boolean": "true or false", "array": "a list",
               "object": "an object", "integer": "an integer", "number": "a number"}


@functools.lru_cache(maxsize=1)
def _document_text() -> str:
    return resources.files("stockade.daemon").joinpath("openapi.yaml").read_text()


def load_document() -> dict:
    """The OpenAPI document as shipped with the package (a fresh copy each call)."""
    return yaml.load(_document_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def key_path(parts) -> str:
    """["files", 0, "text"] -> "files[0].text"."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict
    required: bool
    validator: OAS30Validator


@dataclass
class Operation:
    """What one route takes: ``params`` in the document's order, and a body validator
    (None: the route takes no body)."""

    params: dict[str, Param] = field(default_factory=dict)
    body: OAS30Validator | None = None

    def query(self, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        """Query pairs -> {name: value} converted and checked; a parameter that is
        omitted takes its documented default, or is absent."""
        given: dict[str, list[str]] = {}
        for name, text in pairs:
            if name not in self.params:
                allowed = ", ".join(self.params) or "none"
                raise InvalidRequest(f"unknown query parameter {name!r} (allowed: {allowed})",
                                     name)
            given.setdefault(name, []).append(text)
        out: dict[str, Any] = {}
        for name, p in self.params.items():
            values = given.get(name)
            if values is None:
                if p.required:
                    raise InvalidRequest(f"query parameter {name} is required", name)
                if "default" in p.schema:
                    out[name] = p.schema["default"]
                continue
            value: Any
            if p.schema.get("type") == "array":
                value = [_from_text(name, v, p.schema.get("items", {})) for v in values]
            elif len(values) > 1:
                raise InvalidRequest(f"query parameter {name!r} given twice", name)
            else:
                value = _from_text(name, values[0], p.schema)
            _check(p.validator, value, name)
            out[name] = value
        return out

    def arguments(self, given: dict[str, Any]) -> dict[str, Any]:
        """``query()`` for an in-process caller: {name: value or list of values}, the
        values text as in a URL or already of the parameter's type (None: omitted)."""
        pairs = []
        for name, value in given.items():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None:
                    pairs.append((name, ("true" if v else "false") if isinstance(v, bool)
                                  else str(v)))
        return self.query(pairs)

    def check_body(self, body: Any) -> None:
        if self.body is not None:
            _check(self.body, body, None)


@functools.lru_cache(maxsize=1)
def api_schema() -> "ApiSchema":
    """The shipped document's ApiSchema, built once (the server's and in-process callers')."""
    return ApiSchema()


class ApiSchema:
    def __init__(self, document: dict | None = None):
        self.document = document if document is not None else load_document()
        self._components = self.document.get("components", {})
        self._ops: dict[tuple[str, str], Operation] = {}
        for template, ops in self.document.get("paths", {}).items():
            for method, op in ops.items():
                if method in ("get", "put", "post", "delete", "patch"):
                    self._ops[(method.upper(), template)] = self._operation(op)

    def operation(self, method: str, template: str) -> Operation:
        """The documented operation; a route the document does not have takes no query
        parameters and no body (the route table is checked against it by a test)."""
        return self._ops.get((method, template)) or Operation()

    def documented(self) -> set[tuple[str, str]]:
        return set(self._ops)

    def _validator(self, schema: dict) -> OAS30Validator:
        # refs ("#/components/...") resolve against this root; siblings of $ref are ignored
        return OAS30Validator({"components": self._components, **schema})

    def _resolve(self, obj: dict) -> dict:
        while "$ref" in obj:
            node: Any = self.document
            for part in obj["$ref"].lstrip("#/").split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            obj = node
        return obj

    def _operation(self, op: dict) -> Operation:
        out = Operation()
        for raw in op.get("parameters", []):
            p = self._resolve(raw)
            if p.get("in") != "query":
                continue
            schema = self._resolve(p.get("schema", {}))
            out.params[p["name"]] = Param(p["name"], schema, bool(p.get("required")),
                                          self._validator(schema))
        body = op.get("requestBody")
        if body is not None:
            schema = self._resolve(body)["content"][JSON_TYPE]["schema"]
            out.body = self._validator(schema)
        return out


# ---------------------------------------------------------------- conversions and errors

def _from_text(name: str, text: str, schema: dict) -> Any:
    kind = schema.get("type")
    if kind == "boolean":
        if text in ("true", "false"):
            return text == "true"
        raise InvalidRequest(f'query parameter {name} must be "true" or "false", not {text!r}',
                             name)
    if kind == "integer":
        if _INTEGER.fullmatch(text):
            return int(text)
        raise InvalidRequest(f"query parameter {name} must be an integer, not {text!r}", name)
    if kind == "number":
        try:
            return float(text)
        except ValueError:
            raise InvalidRequest(f"query parameter {name} must be a number, not {text!r}",
                                 name) from None
    return text


def _check(validator: OAS30Validator, value: Any, param: str | None) -> None:
    err = best_match(validator.iter_errors(value))
    if err is not None:
        raise _invalid(err, param)


def _expected(schema: dict) -> str:
    kinds = schema.get("type")
    names = [_TYPE_NAMES.get(k, k) for k in (kinds if isinstance(kinds, list) else [kinds])
             if k]
    if schema.get("nullable"):
        names.append("null")
    return " or ".join(names) or "something else"


def _invalid(err: ValidationError, param: str | None) -> InvalidRequest:
    """One jsonschema error as an InvalidRequest naming the key path."""
    parts = ([param] if param else []) + list(err.absolute_path)
    where = key_path(parts)
    subject = f"query parameter {where}" if param else (where or "the request body")
    kind, value, inst = err.validator, err.validator_value, err.instance
    if kind == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(k for k in inst if k not in allowed)[0]
        return InvalidRequest(f"{where or 'request body'}: unknown field {extra!r} (allowed: "
                              f"{', '.join(allowed) or 'none'})", key_path(parts + [extra]))
    if kind == "required" and isinstance(inst, dict):
        missing = next(k for k in value if k not in inst)
        return InvalidRequest(f"{where or 'request body'}: {missing} is required",
                              key_path(parts + [missing]))
    if kind in ("anyOf", "oneOf") and all(set(b) == {"required"} for b in value):
        names = [" and ".join(b["required"]) for b in value]
        return InvalidRequest(f"{where or 'request body'}: {' or '.join(names)} is required",
                              key_path(parts + [value[0]["required"][0]]))
    if kind in ("anyOf", "oneOf") and err.context and all(
            c.validator == "type" and c.absolute_path == err.absolute_path for c in err.context):
        kinds = " or ".join(dict.fromkeys(_expected(c.schema) for c in err.context))
        return InvalidRequest(f"{subject} must be {kinds}", where or None)
    if kind == "type":
        null = " (not null)" if inst is None else ""
        return InvalidRequest(f"{subject} must be {_expected(err.schema)}{null}", where or None)
    if kind == "enum":
        choices = ", ".join(json.dumps(v) if not isinstance(v, str) else v
                            for v in value if v is not None)
        return InvalidRequest(f"{subject} must be one of {choices}, not {json.dumps(inst)}",
                              where or None)
    bounds = {"minimum": "at least", "maximum": "at most"}
    if kind in bounds:
        return InvalidRequest(f"{subject} must be {bounds[kind]} {value}, not {inst}",
                              where or None)
    if kind == "minLength" and value == 1:
        return InvalidRequest(f"{subject} must not be empty", where or None)
    sizes = {"minLength": ("at least", "characters"), "maxLength": ("at most", "characters"),
             "minItems": ("at least", "items"), "maxItems": ("at most", "items")}
    if kind in sizes:
        bound, unit = sizes[kind]
        return InvalidRequest(f"{subject} must have {bound} {value} {unit}", where or None)
    if kind == "pattern":
        return InvalidRequest(f"{subject} must match {value}", where or None)
    return InvalidRequest(f"{subject}: {err.message}", where or None)
