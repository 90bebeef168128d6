"""Read policy files (YAML or JSON, several documents per file) into Policies.

A file with one bad document is rejected whole; every error names the file, the
document (index and name) and the field path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from ...errors import PolicyError, PolicyErrors
from .rule import Policy
from .validation import sanitize_document

# libyaml's parser when PyYAML has it (about 10x faster), else the pure-Python one.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_documents(text: str, name: str) -> list[Any]:
    """Raw documents of a file: YAML streams (``---``), JSON objects or lists of them."""
    try:
        if name.endswith(".json"):
            data = json.loads(text)
            docs = data if isinstance(data, list) else [data]
        else:
            docs = []
            for d in yaml.load_all(text, Loader=_YAML_LOADER):
                if isinstance(d, list):
                    docs.extend(d)
                elif d is not None:
                    docs.append(d)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else (
            f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "")
        problem = getattr(exc, "problem", None) or getattr(exc, "msg", None) or str(exc)
        raise PolicyErrors([PolicyError("", f"cannot parse{where}: {problem}", file=name)]) from exc
    out = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            out.extend(d["items"])
        else:
            out.append(d)
    return out


def load_text(text: str, name: str, *, allow_l7: bool = False) -> list[Policy]:
    errors: list[PolicyError] = []
    policies = []
    indexes = {}
    for index, doc in enumerate(parse_documents(text, name)):
        doc_name = None
        if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
            doc_name = doc["metadata"].get("name")
        try:
            policies.append(sanitize_document(doc, source=name, allow_l7=allow_l7))
            indexes[id(policies[-1])] = index
        except PolicyErrors as exc:
            errors.extend(e.located(file=name, doc_index=index, doc_name=doc_name) for e in exc.errors)
    seen = {}
    for p in policies:
        if p.ref in seen:
            errors.append(PolicyError("metadata.name", f"policy {p.ref.display} ({p.ref.kind}) "
                                      f"is defined twice (first in document {indexes[id(seen[p.ref])]})",
                                      file=name, doc_index=indexes[id(p)], doc_name=p.ref.name))
        seen[p.ref] = p
    if errors:
        raise PolicyErrors(errors)
    return policies


def load_file(path: str | Path, *, allow_l7: bool = False) -> list[Policy]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyErrors([PolicyError("", f"cannot read: {exc.strerror}", file=str(path))]) from exc
    return load_text(text, str(path), allow_l7=allow_l7)


def load_files(paths: Iterable[str | Path], *, allow_l7: bool = False) -> list[Policy]:
    """All files or nothing; a policy defined in two files is an error."""
    errors: list[PolicyError] = []
    policies: list[Policy] = []
    for p in paths:
        try:
            policies.extend(load_file(p, allow_l7=allow_l7))
        except PolicyErrors as exc:
            errors.extend(exc.errors)
    seen: dict = {}
    for pol in policies:
        if pol.ref in seen and seen[pol.ref] != pol.source:
            errors.append(PolicyError("metadata.name", f"policy {pol.ref.display} is also defined "
                                      f"in {seen[pol.ref]}", file=pol.source))
        seen[pol.ref] = pol.source
    if errors:
        raise PolicyErrors(errors)
    return policies
