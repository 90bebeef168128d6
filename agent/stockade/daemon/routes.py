"""The API's routes: who may call each, and how each becomes an AgentService call.

``ROUTES`` is a table of ``Route(method, template, handler, access)``. A template's
``{name}`` segments match one percent-decoded path segment, so an ipcache prefix
travels as ``10.0.0.0%2F8``. docs/api/openapi.yaml documents exactly these routes (a
test checks it) and is where each route's query parameters and body are described;
the server validates both against it before a handler runs, so a handler gets typed
query values (``r.query["dry_run"]`` is a bool) and a body of the documented shape.

``access`` is the permission table: READ routes are for any peer that can connect;
DRY_RUN routes are read-only with ``dry_run=true`` in the query and a change otherwise;
CHANGE routes are changes. Changes need uid 0. ``grant()`` decides it from the method,
path and query alone, before any body is read.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ..errors import HTTPError, InvalidRequest, PermissionDenied
from .connections import Limits, is_root

if TYPE_CHECKING:
    from .contract import AgentService
    from .server import APIServer

JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NDJSON_TYPE = "application/x-ndjson"


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


class Access(enum.Enum):
    READ = "read"            # any peer that can connect
    DRY_RUN = "dry-run"      # read-only with dry_run=true, else a change
    CHANGE = "change"        # uid 0 only


@dataclass(frozen=True)
class Grant:
    """What a peer may do with one request: ``max_body`` bytes of body (0: none)."""

    read_only: bool
    max_body: int


def grant(route: "Route", query: list[tuple[str, str]], cred: PeerCred | None,
          limits: Limits, takes_body: bool) -> Grant:
    """The peer's permission for ``route`` with these raw query pairs; PermissionDenied
    if it is a change and the peer is not uid 0. Root may send ``limits.root_body``
    bytes; a member ``limits.member_body``, and only to a read-only route."""
    dry_run = [v for k, v in query if k == "dry_run"] == ["true"]
    read_only = route.access is Access.READ or (route.access is Access.DRY_RUN and dry_run)
    root = cred is not None and is_root(cred.uid)
    if not read_only and not root:
        who = "an unknown peer" if cred is None else f"uid {cred.uid} (pid {cred.pid})"
        hint = (" (with dry_run=true it only computes the plan, and any member of the "
                "socket's group may ask)" if route.access is Access.DRY_RUN else "")
        raise PermissionDenied(f"{route.method} {route.template} changes the agent's state "
                               f"and needs root{hint}; the request came from {who}")
    limit = limits.root_body if root else limits.member_body
    return Grant(read_only, limit if takes_body else 0)


# ---------------------------------------------------------------- requests and responses

@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]          # path parameters, decoded
    query: dict[str, Any]           # query parameters, converted and validated
    body: Any                       # the validated JSON object, or None
    cred: PeerCred | None
    agent: "AgentService"
    server: "APIServer"


@dataclass
class Response:
    """``body`` is a JSON-ready object (sent as JSON), ``str``/``bytes`` (sent as is with
    ``content_type``) or an iterator of bytes (sent chunked)."""

    status: int = 200
    body: Any = None
    content_type: str = JSON_TYPE
    headers: dict = field(default_factory=dict)


# ---------------------------------------------------------------- handlers

def get_health(r: Request) -> Response:
    return Response(body=r.agent.health())


def get_endpoints(r: Request) -> Response:
    return Response(body=r.agent.list_endpoints())


def post_endpoint(r: Request) -> Response:
    return Response(201, r.agent.add_endpoint(r.body))


def delete_endpoint(r: Request) -> Response:
    r.agent.remove_endpoint(r.params["name"])
    return Response(204)


def post_oci_hook(r: Request) -> Response:
    return Response(body=r.agent.oci_hook(r.body))


def get_identities(r: Request) -> Response:
    return Response(body=r.agent.list_identities())


def get_ipcache(r: Request) -> Response:
    return Response(body=r.agent.list_ipcache())


def post_ipcache(r: Request) -> Response:
    return Response(201, r.agent.add_ipcache(r.body))


def patch_ipcache(r: Request) -> Response:
    return Response(200, r.agent.add_ipcache_entries(r.body))


def delete_ipcache(r: Request) -> Response:
    r.agent.remove_ipcache(r.params["prefix"])
    return Response(204)


def get_policies(r: Request) -> Response:
    return Response(body=r.agent.list_policies())


def put_policies(r: Request) -> Response:
    return Response(body=r.agent.put_policies(r.body["files"],
                                              replace_all=r.query["replace_all"],
                                              dry_run=r.query["dry_run"]))


def delete_policy(r: Request) -> Response:
    name = r.params["name"]
    if name == "*":
        raise InvalidRequest('use DELETE /v1/policies to remove every policy, not the name "*"',
                             "name")
    return Response(body=r.agent.delete_policy(name, r.query.get("namespace") or None,
                                               r.query.get("kind"), dry_run=r.query["dry_run"]))


def delete_all_policies(r: Request) -> Response:
    return Response(body=r.agent.delete_policy("*", None, None, dry_run=r.query["dry_run"]))


def get_metrics(r: Request) -> Response:
    return Response(body=r.agent.metrics(), content_type=METRICS_TYPE)


def get_services(r: Request) -> Response:
    return Response(body={"services": r.agent.list_services(),
                          "conflicts": r.agent.service_conflicts()})


def put_services(r: Request) -> Response:
    return Response(body=r.agent.set_services(r.body["services"], dry_run=r.query["dry_run"]))


def get_flows(r: Request) -> Response:
    """Recent flows (a FlowList), or with follow=true a chunked stream of JSON lines
    (one Flow each; a bare newline is a heartbeat)."""
    criteria = {k: v for k, v in r.query.items() if k not in ("follow", "limit")}
    if "limit" in r.query:
        if "last" in r.query:
            raise InvalidRequest("give last or limit, not both", "limit")
        criteria["last"] = r.query["limit"]
    if r.query.get("follow"):
        from .flowsource import json_lines
        flows = r.agent.follow_flows(criteria, stopping=r.server.stopping)
        return Response(body=json_lines(flows), content_type=NDJSON_TYPE)
    return Response(body=r.agent.flows(criteria))


def get_trace(r: Request) -> Response:
    q = r.query
    http = {k: q[f"http_{k}"] for k in ("method", "path", "host", "header")
            if q.get(f"http_{k}") not in (None, [])}
    if "header" in http:
        http["headers"] = http.pop("header")
    return Response(body=r.agent.trace(q["src"], q["dst"], q["dport"], http or None))


def get_matrix(r: Request) -> Response:
    return Response(body=r.agent.matrix(dict(r.query)))


def post_review(r: Request) -> Response:
    return Response(body=r.agent.review(r.body["files"],
                                        replace_all=r.body.get("replace_all", False)))


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Route:
    method: str
    template: str                   # "/v1/endpoints/{name}"
    handler: Callable[[Request], Response]
    access: Access = Access.READ

    @property
    def pattern(self) -> re.Pattern:
        parts = []
        for seg in self.template.strip("/").split("/"):
            m = re.fullmatch(r"\{(\w+)\}", seg)
            parts.append(f"(?P<{m.group(1)}>[^/]+)" if m else re.escape(seg))
        return re.compile("^/" + "/".join(parts) + "$")


READ, DRY_RUN, CHANGE = Access.READ, Access.DRY_RUN, Access.CHANGE

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", get_health, READ),
    Route("GET", "/v1/endpoints", get_endpoints, READ),
    Route("POST", "/v1/endpoints", post_endpoint, CHANGE),
    Route("DELETE", "/v1/endpoints/{name}", delete_endpoint, CHANGE),
    Route("POST", "/v1/hooks/oci", post_oci_hook, CHANGE),
    Route("GET", "/v1/identities", get_identities, READ),
    Route("GET", "/v1/ipcache", get_ipcache, READ),
    Route("POST", "/v1/ipcache", post_ipcache, CHANGE),
    Route("PATCH", "/v1/ipcache", patch_ipcache, CHANGE),
    Route("DELETE", "/v1/ipcache/{prefix}", delete_ipcache, CHANGE),
    Route("GET", "/v1/policies", get_policies, READ),
    Route("PUT", "/v1/policies", put_policies, DRY_RUN),
    Route("DELETE", "/v1/policies", delete_all_policies, DRY_RUN),
    Route("DELETE", "/v1/policies/{name}", delete_policy, DRY_RUN),
    Route("GET", "/v1/metrics", get_metrics, READ),
    Route("GET", "/metrics", get_metrics, READ),
    Route("GET", "/v1/services", get_services, READ),
    Route("PUT", "/v1/services", put_services, DRY_RUN),
    Route("GET", "/v1/flows", get_flows, READ),
    Route("GET", "/v1/trace", get_trace, READ),
    Route("GET", "/v1/matrix", get_matrix, READ),
    Route("POST", "/v1/review", post_review, READ),
)


class Router:
    def __init__(self, routes: Iterable[Route]):
        self.routes: list[tuple[Route, re.Pattern]] = []
        for route in routes:
            self.add(route)

    def add(self, route: Route) -> None:
        self.routes.append((route, route.pattern))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route, pattern in self.routes:
            m = pattern.match(path)
            if m:
                try:
                    params = {k: unquote(v, errors="strict") for k, v in m.groupdict().items()}
                except UnicodeDecodeError:
                    raise HTTPError(400, "path is not valid UTF-8 after percent-decoding") from None
                if route.method == method:
                    return route, params
                allowed.append(route.method)
        if allowed:
            methods = ", ".join(sorted(set(allowed)))
            raise HTTPError(405, f"{method} is not allowed on {path} (allowed: {methods})",
                            headers={"Allow": methods})
        raise HTTPError(404, f"no such API route: {path}")
