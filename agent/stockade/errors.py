"""Errors raised by Stockade.

    StockadeError                 base of everything below; ``str()`` is the message for users
    ├── PolicyError               one problem in a policy document, with file, document and path
    ├── PolicyErrors              several PolicyErrors found in one load (a file is rejected whole)
    ├── SelectorError             a command-line selector (SEL) that cannot be parsed
    ├── IdentityError             identity allocation or persistence failed
    ├── InvalidRequest            API/CLI input that fails validation (HTTP 400)
    ├── NotFound                  no such endpoint, policy or ipcache entry (HTTP 404)
    ├── Conflict                  clashes with existing state (HTTP 409)
    ├── PermissionDenied          a change asked for by a non-root peer (HTTP 403)
    └── (datapath.errors.DatapathError, discovery.errors.DiscoveryError, client.ClientError)
"""
from __future__ import annotations


class StockadeError(Exception):
    """Base class; carries a message and, where it applies, the offending field."""

    field: str | None = None

    def to_dict(self) -> dict:
        return {"message": str(self), "field": self.field}


class PolicyError(StockadeError):
    """A problem at ``path`` in document ``doc_index`` (named ``doc_name``) of ``file``.

    Renders as ``file: document 2 (web-policy): spec.ingress[0].toPorts[1].ports[0].port:
    "http2" is not a port number``.
    """

    def __init__(self, path: str, msg: str, *, file: str | None = None,
                 doc_index: int | None = None, doc_name: str | None = None):
        self.path, self.msg = path, msg
        self.file, self.doc_index, self.doc_name = file, doc_index, doc_name
        super().__init__(self._render())

    @property
    def field(self) -> str:  # type: ignore[override]
        return self.path

    def located(self, *, file=None, doc_index=None, doc_name=None) -> "PolicyError":
        return PolicyError(self.path, self.msg,
                           file=file if file is not None else self.file,
                           doc_index=doc_index if doc_index is not None else self.doc_index,
                           doc_name=doc_name if doc_name is not None else self.doc_name)

    def _render(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.doc_index is not None:
            doc = f"document {self.doc_index}"
            if self.doc_name:
                doc += f" ({self.doc_name})"
            where.append(doc)
        prefix = ": ".join(where)
        body = f"{self.path}: {self.msg}" if self.path else self.msg
        return f"{prefix}: {body}" if prefix else body

    def to_dict(self) -> dict:
        return {"message": str(self), "field": self.path, "file": self.file,
                "document": self.doc_index, "name": self.doc_name, "reason": self.msg}


class PolicyErrors(StockadeError):
    """Every problem found while loading; nothing from the load is used."""

    def __init__(self, errors: list[PolicyError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    @property
    def field(self) -> str | None:  # type: ignore[override]
        return self.errors[0].path if self.errors else None

    def to_dict(self) -> dict:
        first = self.errors[0].to_dict() if self.errors else {}
        return {"message": str(self), "field": first.get("field"),
                "errors": [e.to_dict() for e in self.errors]}


class SelectorError(StockadeError):
    """A SEL argument (``cidr:``, ``entity:`` or ``k=v,...``) that cannot be parsed."""


class IdentityError(StockadeError):
    """Identity numbers could not be allocated or persisted."""


class InvalidRequest(StockadeError):
    """An API/CLI input that fails validation; ``field`` names the offending field."""

    def __init__(self, msg: str, field: str | None = None):
        super().__init__(msg)
        self.field = field


class NotFound(StockadeError):
    """The named endpoint, policy or ipcache entry does not exist."""

    def __init__(self, msg: str, field: str | None = None):
        super().__init__(msg)
        self.field = field


class Conflict(StockadeError):
    """The request clashes with existing state (a name or interface already in use)."""

    def __init__(self, msg: str, field: str | None = None):
        super().__init__(msg)
        self.field = field


class PermissionDenied(StockadeError):
    """A change was asked for by a peer that is not uid 0."""
