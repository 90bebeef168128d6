"""Errors raised by Stockade.

    StockadeError                 base of everything below; ``str()`` is the message for users
    ├── PolicyError               one problem in a policy document, with file, document and path
    ├── PolicyErrors              several PolicyErrors found in one load (a file is rejected whole)
    ├── SelectorError             a command-line selector (SEL) that cannot be parsed
    ├── IdentityError             identity allocation or persistence failed
    ├── StateError                a state file that cannot be read, is damaged, or cannot be written
    ├── InvalidRequest            API/CLI input that fails validation
    ├── NotFound                  no such endpoint, policy or ipcache entry
    ├── Conflict                  clashes with existing state
    ├── PermissionDenied          a change asked for by a non-root peer
    ├── HTTPError                 the API server's own refusal (no such route, body too large...)
    └── (datapath.errors.DatapathError, discovery.errors.DiscoveryError, client.ClientError)

Each class says which HTTP status the API answers it with (``http_status``): 500 unless
a class below says otherwise; 400 for PolicyError, PolicyErrors, SelectorError and
InvalidRequest, 403 PermissionDenied, 404 NotFound, 409 Conflict, 507 for the datapath's
CapacityError and for a StateError of a full disk, and an HTTPError's own status.
"""
from __future__ import annotations


class StockadeError(Exception):
    """Base class; carries a message and, where it applies, the offending field."""

    field: str | None = None
    http_status: int = 500

    def to_dict(self) -> dict:
        return {"message": str(self), "field": self.field}


class PolicyError(StockadeError):
    """A problem at ``path`` in document ``doc_index`` (named ``doc_name``) of ``file``.

    Renders as ``file: document 2 (web-policy): spec.ingress[0].toPorts[1].ports[0].port:
    "http2" is not a port number``.
    """

    http_status = 400

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

    http_status = 400

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

    http_status = 400


class IdentityError(StockadeError):
    """Identity numbers could not be allocated or persisted."""


class StateError(StockadeError):
    """A state file (``path``) that cannot be read, is damaged or in the wrong shape, or
    cannot be written (``problem`` says which). Renders as ``path: problem``. A write
    that failed for want of space answers 507, any other 500."""

    def __init__(self, path, problem: str, *, no_space: bool = False):
        self.path, self.problem = str(path), problem
        self.http_status = 507 if no_space else 500
        super().__init__(f"{self.path}: {problem}")


class InvalidRequest(StockadeError):
    """An API/CLI input that fails validation; ``field`` names the offending field."""

    http_status = 400

    def __init__(self, msg: str, field: str | None = None):
        super().__init__(msg)
        self.field = field


class NotFound(StockadeError):
    """The named endpoint, policy or ipcache entry does not exist."""

    http_status = 404

    def __init__(self, msg: str, field: str | None = None):
        super().__init__(msg)
        self.field = field


class Conflict(StockadeError):
    """The request clashes with existing state (a name or interface already in use)."""

    http_status = 409

    def __init__(self, msg: str, field: str | None = None):
        super().__init__(msg)
        self.field = field


class PermissionDenied(StockadeError):
    """A change was asked for by a peer that is not uid 0."""

    http_status = 403


class HTTPError(StockadeError):
    """A refusal of the API server itself, before the agent is asked: no such route
    (404), wrong method (405), a body the peer may not send or that is too large (411,
    413), not JSON (415), too slow (408), too many connections (503). ``headers`` go
    out with the answer (``Allow`` for a 405)."""

    def __init__(self, status: int, msg: str, field: str | None = None,
                 headers: dict | None = None):
        super().__init__(msg)
        self.http_status, self.field, self.headers = status, field, headers or {}
