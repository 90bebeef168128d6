"""Read policy files (YAML or JSON, several documents per file) into Policies.

A file with one bad document is rejected whole; every error names the file, the
document (index and name) and the field path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ...errors import PolicyError, PolicyErrors
from .rule import Policy
from .safeload import LIMITS, Limits, ReadError, check_size, read_file, read_json, read_yaml
from .validation import render_path, sanitize_document

# A file with more errors than this is reported with the first ones only (the rest of
# its documents are not checked: thousands of errors help nobody and cost time).
MAX_ERRORS = 100


def parse_documents(text: str, name: str, *, limits: Limits = LIMITS) -> list[Any]:
    """Raw documents of a file: YAML streams (``---``), JSON objects or lists of them;
    a top-level list's items and a ``kind: List``'s items are documents. Any problem,
    limits included (safeload.Limits), is PolicyErrors naming the file, document and
    field path."""
    is_json = name.endswith(".json")
    try:
        data = check_size(text, limits)
        streams = [read_json(text.removeprefix("\ufeff"), limits)] if is_json else read_yaml(data, limits)
    except ReadError as exc:
        raise PolicyErrors([_located(exc, name)]) from None
    out = []
    for d in streams:
        out.extend(_documents(d, is_json=is_json))
    return out


def _documents(stream_doc: Any, *, is_json: bool = False) -> list:
    if isinstance(stream_doc, list):
        items = stream_doc
    elif stream_doc is None and not is_json:
        items = []  # an empty YAML document
    else:
        items = [stream_doc]
    out: list[Any] = []
    for d in items:
        out.extend(d["items"] if _is_list_kind(d) else [d])
    return out


def _is_list_kind(d: Any) -> bool:
    return isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list)


def _located(exc: ReadError, name: str) -> PolicyError:
    """A reader's error, with the document index and path as load_text counts them
    (a top-level list's items and a List's items are documents of their own)."""
    msg = exc.detail
    if exc.doc is None:
        return PolicyError("", msg, file=name)
    index = sum(len(_documents(d)) for d in exc.before)
    path, conts = list(exc.path), list(exc.containers)
    if path and isinstance(path[0], int):  # in a top-level list
        i = path.pop(0)
        if conts:
            index += sum(len(d["items"]) if _is_list_kind(d) else 1 for d in conts.pop(0)[:i])
        else:  # the JSON token scan knows no values: one document per item
            index += i
    doc = conts[0] if conts else None
    if (isinstance(doc, dict) and doc.get("kind") == "List" and len(path) >= 2
            and path[0] == "items" and isinstance(path[1], int) and len(conts) > 1
            and isinstance(conts[1], list)):
        index += path[1]
        path, conts = path[2:], conts[2:]
        doc = conts[0] if conts else None
    return PolicyError(render_path(_short(p) for p in path), msg, file=name, doc_index=index,
                       doc_name=_doc_name(doc))


def _short(part):
    """A key or name for a message: one longer than any valid name (253) is cut."""
    return part if isinstance(part, int) or len(part) <= 256 else part[:256] + "..."


def _doc_name(doc: Any) -> str | None:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return _short(name) if isinstance(name, str) else None


def load_text(text: str, name: str, *, limits: Limits = LIMITS) -> list[Policy]:
    errors: list[PolicyError] = []
    policies = []
    indexes = {}
    docs = parse_documents(text, name, limits=limits)
    checked = len(docs)
    for index, doc in enumerate(docs):
        if len(errors) >= MAX_ERRORS:
            checked = index
            break
        doc_name = _doc_name(doc)
        try:
            policies.append(sanitize_document(doc, source=name))
            indexes[id(policies[-1])] = index
        except PolicyErrors as exc:
            errors.extend(e.located(file=name, doc_index=index, doc_name=doc_name)
                          for e in exc.errors[:MAX_ERRORS])
    seen: dict = {}
    for p in policies:
        if p.ref in seen:
            errors.append(PolicyError("metadata.name", f"policy {p.ref.display} ({p.ref.kind}) "
                                      f"is defined twice (first in document {indexes[id(seen[p.ref])]})",
                                      file=name, doc_index=indexes[id(p)], doc_name=p.ref.name))
        seen[p.ref] = p
    if len(errors) >= MAX_ERRORS:
        unchecked = f"; documents {checked} to {len(docs) - 1} were not checked" if checked < len(docs) else ""
        errors = errors[:MAX_ERRORS] + [PolicyError(
            "", f"stopped after {MAX_ERRORS} errors (there may be more){unchecked}", file=name)]
    if errors:
        raise PolicyErrors(errors)
    return policies


def read_policy_file(path: str | Path, *, limits: Limits = LIMITS) -> str:
    """A policy file's text (at most ``limits.bytes``, UTF-8), or PolicyErrors."""
    try:
        return read_file(path, limits)
    except OSError as exc:
        raise PolicyErrors([PolicyError("", f"cannot read: {exc.strerror or exc}",
                                        file=str(path))]) from None
    except ReadError as exc:
        raise PolicyErrors([_located(exc, str(path))]) from None


def load_file(path: str | Path, *, limits: Limits = LIMITS) -> list[Policy]:
    return load_text(read_policy_file(path, limits=limits), str(path),
                     limits=limits)


def load_data_file(path: str | Path) -> Any:
    """The one YAML (or JSON) document of a data file that goes with policies (policy
    tests, services, workloads), read within the same limits; None if it is empty.
    Problems are PolicyErrors naming the file and the field path."""
    text = read_policy_file(path)
    try:
        docs = read_yaml(check_size(text))
    except ReadError as exc:
        raise PolicyErrors([PolicyError(render_path(_short(p) for p in exc.path), exc.detail,
                                        file=str(path))]) from None
    if len(docs) > 1:
        raise PolicyErrors([PolicyError("", "expected one YAML document, found several",
                                        file=str(path))])
    return docs[0] if docs else None


def load_files(paths: Iterable[str | Path]) -> list[Policy]:
    """All files or nothing; a policy defined in two files is an error."""
    errors: list[PolicyError] = []
    policies: list[Policy] = []
    for p in paths:
        try:
            policies.extend(load_file(p))
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
