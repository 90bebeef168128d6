"""The agent's HTTP/1.1 JSON API on a unix socket: a thin translation of AgentService.

Who may do what: the socket file is ``mode`` (0660) and owned by ``root:<group>``, so
the file system decides who can connect at all; any peer that connects may read (GET).
Changes (POST, PUT, DELETE) also need the peer's uid, read with SO_PEERCRED on every
connection, to be 0; otherwise 403. There is no other authentication.

Routing: ``ROUTES`` is a table of ``Route(method, template, handler, params, body)``.
A template's ``{name}`` segments match one percent-decoded path segment, so an ipcache
prefix travels as ``10.0.0.0%2F8``. The table is what docs/api/openapi.yaml documents;
a test checks that the two agree. A path that matches no template is 404; a path that
matches with another method is 405 (with ``Allow``).

Every input is checked here before the agent sees it: the body must be JSON of the
route's shape (unknown keys are 400 naming the key), query parameters must be known
(400 naming the parameter), bodies are capped at ``MAX_BODY`` (413). Errors go out as
``{"error": {"message", "field", ...}}`` with the status of ``status_for``. Anything
that is not a StockadeError is logged with its traceback and answered with a generic
500: its text may describe internal state and is not for the peer.

Streaming: a handler may return ``Response(body=<iterator of bytes>)``; it is sent with
``Transfer-Encoding: chunked``, one chunk per item, flushed as it comes, and ends when
the iterator does, when the peer goes away, or when the server stops
(``APIServer.stopping`` is set; long-running iterators should check it between items).
To add such a route (e.g. ``GET /v1/flows?follow=true``), add a ``Route`` to ``ROUTES``
whose handler returns a streaming Response, and document it in openapi.yaml.
"""
from __future__ import annotations

import grp
import http.server
import json
import logging
import os
import re
import socket
import socketserver
import stat
import struct
import threading
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import (Conflict, InvalidRequest, NotFound, PermissionDenied, PolicyError,
                      PolicyErrors, SelectorError, StockadeError)
from .contract import AgentService

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
IDLE_TIMEOUT_S = 120.0
POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


# ---------------------------------------------------------------- errors and peers

def status_for(exc: BaseException) -> int:
    """HTTP status of an error, as daemon/contract.py lays down."""
    if isinstance(exc, (InvalidRequest, PolicyErrors, PolicyError, SelectorError)):
        return 400
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if getattr(exc, "capacity", False) or type(exc).__name__ == "CapacityError":
        return 507
    return 500


class HTTPError(Exception):
    """A protocol-level refusal (404, 405, 411, 413, 415) raised inside the server."""

    def __init__(self, status: int, msg: str, field: str | None = None,
                 headers: dict | None = None):
        super().__init__(msg)
        self.status, self.field, self.headers = status, field, headers or {}

    def to_dict(self) -> dict:
        return {"message": str(self), "field": self.field}


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred | None:
    """SO_PEERCRED of a connected unix socket; None where the kernel gives none."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return PeerCred(*struct.unpack("3i", raw))


def check_permission(method: str, cred: PeerCred | None) -> None:
    """Reads are for anyone who could connect; changes are for uid 0 only."""
    if method not in MUTATING:
        return
    if cred is None or cred.uid != 0:
        who = "an unknown peer" if cred is None else f"uid {cred.uid} (pid {cred.pid})"
        raise PermissionDenied(f"{method} needs root; the request came from {who}")


# ---------------------------------------------------------------- requests and responses

@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]          # path parameters, decoded
    query: dict[str, Any]           # validated query parameters (a list for Route.multi)
    body: Any                       # parsed JSON, or None
    cred: PeerCred | None
    agent: AgentService
    server: "APIServer"


@dataclass
class Response:
    """``body`` is a JSON-ready object (sent as JSON), ``str``/``bytes`` (sent as is with
    ``content_type``) or an iterator of bytes (sent chunked)."""

    status: int = 200
    body: Any = None
    content_type: str = JSON_TYPE
    headers: dict = field(default_factory=dict)


def error_body(exc: BaseException) -> dict:
    return {"error": exc.to_dict()}  # type: ignore[attr-defined]


# ---------------------------------------------------------------- input checks

def _bool(query: dict, name: str, default: bool = False) -> bool:
    v = query.get(name)
    if v is None:
        return default
    if v in ("true", "false"):
        return v == "true"
    raise InvalidRequest(f'query parameter {name} must be "true" or "false", not {v!r}', name)


def _object(body: Any, allowed: dict[str, tuple], required: Iterable[str], what: str) -> dict:
    """Check a JSON object: only ``allowed`` keys, each of one of its types, ``required``
    present. Types: a tuple of Python types; ``None`` in it allows JSON null."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    for key, value in body.items():
        if key not in allowed:
            raise InvalidRequest(f"{what}: unknown field {key!r} (allowed: "
                                 f"{', '.join(sorted(allowed))})", key)
        types = allowed[key]
        if value is None and type(None) in types:
            continue
        # bool is an int in Python; an int field must not take true/false
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join(_TYPE_NAMES[t] for t in types)
            raise InvalidRequest(f"{what}: {key} must be {names}", key)
    for key in required:
        if key not in body:
            raise InvalidRequest(f"{what}: {key} is required", key)
    return body


_TYPE_NAMES = {str: "a string", bool: "true or false", list: "a list", dict: "an object",
               type(None): "null", int: "an integer"}


def _labels(value: Any, field_name: str) -> None:
    if isinstance(value, str):
        return
    for k, v in value.items():
        if not isinstance(v, str):
            raise InvalidRequest(f"{field_name}.{k} must be a string", f"{field_name}.{k}")


def _string_list(value: Any, field_name: str) -> None:
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidRequest(f"{field_name}[{i}] must be a string", f"{field_name}[{i}]")


# ---------------------------------------------------------------- route handlers

def get_health(r: Request) -> Response:
    return Response(body=r.agent.health())


def get_endpoints(r: Request) -> Response:
    return Response(body=r.agent.list_endpoints())


def post_endpoint(r: Request) -> Response:
    spec = _object(r.body, {"name": (str,), "interface": (str,), "ips": (list,),
                            "labels": (dict, str), "audit": (bool,), "mac": (str,)},
                   ("name", "ips"), "endpoint")  # interface or mac: parse_spec
    _string_list(spec["ips"], "ips")
    if "labels" in spec:
        _labels(spec["labels"], "labels")
    return Response(201, r.agent.add_endpoint(spec))


def delete_endpoint(r: Request) -> Response:
    r.agent.remove_endpoint(r.params["name"])
    return Response(204)


def get_identities(r: Request) -> Response:
    return Response(body=r.agent.list_identities())


def get_ipcache(r: Request) -> Response:
    return Response(body=r.agent.list_ipcache())


def post_ipcache(r: Request) -> Response:
    entry = _object(r.body, {"prefix": (str,), "labels": (dict,), "host": (str, type(None)),
                             "node": (bool,)}, ("prefix",), "ipcache entry")
    if "labels" in entry:
        _labels(entry["labels"], "labels")
    return Response(201, r.agent.add_ipcache(entry))


def delete_ipcache(r: Request) -> Response:
    r.agent.remove_ipcache(r.params["prefix"])
    return Response(204)


def get_policies(r: Request) -> Response:
    return Response(body=r.agent.list_policies())


def put_policies(r: Request) -> Response:
    body = _object(r.body, {"files": (list,)}, ("files",), "request")
    for i, f in enumerate(body["files"]):
        _object(f, {"name": (str,), "text": (str,)}, ("name", "text"), f"files[{i}]")
    return Response(body=r.agent.put_policies(
        body["files"], replace_all=_bool(r.query, "replace_all"),
        dry_run=_bool(r.query, "dry_run")))


def delete_policy(r: Request) -> Response:
    name = r.params["name"]
    if name == "*":
        raise InvalidRequest('use DELETE /v1/policies to remove every policy, not the name "*"',
                             "name")
    kind = r.query.get("kind") or None
    if kind is not None and kind not in POLICY_KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(POLICY_KINDS)}, not {kind!r}", "kind")
    return Response(body=r.agent.delete_policy(
        name, r.query.get("namespace") or None, kind,
        dry_run=_bool(r.query, "dry_run")))


def delete_all_policies(r: Request) -> Response:
    return Response(body=r.agent.delete_policy("*", None, None, dry_run=_bool(r.query, "dry_run")))


def get_metrics(r: Request) -> Response:
    return Response(body=r.agent.metrics(), content_type=METRICS_TYPE)


def get_services(r: Request) -> Response:
    return Response(body={"services": r.agent.list_services(),
                          "conflicts": r.agent.service_conflicts()})


def put_services(r: Request) -> Response:
    body = _object(r.body, {"services": (dict,)}, ("services",), "request")
    return Response(body=r.agent.set_services(body["services"], dry_run=_bool(r.query, "dry_run")))


NDJSON_TYPE = "application/x-ndjson"
FLOW_LIST_PARAMS = ("verdict", "drop_reason", "direction", "protocol", "port", "from_port",
                    "to_port", "identity", "from_identity", "to_identity", "ip", "from_ip",
                    "to_ip", "label", "from_label", "to_label", "endpoint", "from_endpoint",
                    "to_endpoint")


def get_flows(r: Request) -> Response:
    """Recent flows (a FlowList), or with follow=true a chunked stream of JSON lines
    (one Flow each; a bare newline is a heartbeat)."""
    criteria = {k: v for k, v in r.query.items() if k not in ("follow", "limit")}
    if "limit" in r.query:
        if "last" in r.query:
            raise InvalidRequest("give last or limit, not both", "limit")
        criteria["last"] = r.query["limit"]
    if _bool(r.query, "follow"):
        from .flowsource import json_lines
        flows = r.agent.follow_flows(criteria, stopping=r.server.stopping)
        return Response(body=json_lines(flows), content_type=NDJSON_TYPE)
    return Response(body=r.agent.flows(criteria))


@dataclass(frozen=True)
class Route:
    method: str
    template: str                   # "/v1/endpoints/{name}"
    handler: Callable[[Request], Response]
    params: tuple[str, ...] = ()    # allowed query parameters
    body: bool = False              # takes a JSON body
    multi: tuple[str, ...] = ()     # params that may repeat (their value is a list)

    @property
    def pattern(self) -> re.Pattern:
        parts = []
        for seg in self.template.strip("/").split("/"):
            m = re.fullmatch(r"\{(\w+)\}", seg)
            parts.append(f"(?P<{m.group(1)}>[^/]+)" if m else re.escape(seg))
        return re.compile("^/" + "/".join(parts) + "$")


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", get_health),
    Route("GET", "/v1/endpoints", get_endpoints),
    Route("POST", "/v1/endpoints", post_endpoint, body=True),
    Route("DELETE", "/v1/endpoints/{name}", delete_endpoint),
    Route("GET", "/v1/identities", get_identities),
    Route("GET", "/v1/ipcache", get_ipcache),
    Route("POST", "/v1/ipcache", post_ipcache, body=True),
    Route("DELETE", "/v1/ipcache/{prefix}", delete_ipcache),
    Route("GET", "/v1/policies", get_policies),
    Route("PUT", "/v1/policies", put_policies, ("dry_run", "replace_all"), body=True),
    Route("DELETE", "/v1/policies", delete_all_policies, ("dry_run",)),
    Route("DELETE", "/v1/policies/{name}", delete_policy, ("namespace", "kind", "dry_run")),
    Route("GET", "/v1/metrics", get_metrics),
    Route("GET", "/v1/services", get_services),
    Route("PUT", "/v1/services", put_services, ("dry_run",), body=True),
    Route("GET", "/v1/flows", get_flows,
          FLOW_LIST_PARAMS + ("since", "last", "limit", "follow"), multi=FLOW_LIST_PARAMS),
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
                params = {k: unquote(v, errors="strict") for k, v in m.groupdict().items()}
                if route.method == method:
                    return route, params
                allowed.append(route.method)
        if allowed:
            raise HTTPError(405, f"{method} is not allowed on {path} (allowed: "
                                 f"{', '.join(sorted(set(allowed)))})",
                            headers={"Allow": ", ".join(sorted(set(allowed)))})
        raise HTTPError(404, f"no such API route: {path}")


# ---------------------------------------------------------------- HTTP plumbing

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stockade-agent"
    sys_version = ""
    timeout = IDLE_TIMEOUT_S
    server: "_UnixHTTPServer"

    def setup(self):
        super().setup()
        self.cred = peer_cred(self.connection)

    def address_string(self):
        return f"pid={self.cred.pid},uid={self.cred.uid}" if self.cred else "unix"

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code, message=None, explain=None):
        """Errors the base class finds itself (bad request line, headers) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # not spoken here; answer with a status line
            self.request_version = "HTTP/1.0"
        self._send(Response(code, {"error": {"message": message or self.responses.get(
            code, ("error",))[0], "field": None}}))

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, f"bad Content-Length: {raw!r}", "Content-Length") from None
        if length > MAX_BODY:
            self.close_connection = True  # the body stays unread
            raise HTTPError(413, f"request body of {length} bytes is over the limit of "
                                 f"{MAX_BODY} bytes")
        return self.rfile.read(length) if length else b""

    def _dispatch(self):
        api: APIServer = self.server.api
        try:
            resp = self._handle(api)
        except (StockadeError, HTTPError) as exc:
            status = exc.status if isinstance(exc, HTTPError) else status_for(exc)
            if status >= 500:
                log.error("%s %s failed: %s", self.command, self.path, exc)
            headers = exc.headers if isinstance(exc, HTTPError) else {}
            resp = Response(status, error_body(exc), headers=headers)
        except Exception:  # noqa: BLE001 - the boundary: log it, tell the peer nothing
            log.exception("%s %s: unexpected error", self.command, self.path)
            resp = Response(500, {"error": {"message": "internal error in the agent; "
                                            "see its log", "field": None}})
        self._send(resp)

    def _handle(self, api: "APIServer") -> Response:
        url = urlsplit(self.path)
        try:
            route, params = api.router.match(self.command, url.path)
        except UnicodeDecodeError:
            raise HTTPError(400, "path is not valid UTF-8 after percent-decoding") from None
        raw = self._read_body()
        check_permission(self.command, self.cred)
        try:
            pairs = parse_qsl(url.query, keep_blank_values=True, strict_parsing=False,
                              errors="strict")
        except UnicodeDecodeError:
            raise InvalidRequest("query string is not valid UTF-8") from None
        query: dict[str, Any] = {}
        for k, v in pairs:
            if k not in route.params:
                allowed = ", ".join(route.params) or "none"
                raise InvalidRequest(f"unknown query parameter {k!r} (allowed: {allowed})", k)
            if k in route.multi:
                query.setdefault(k, []).append(v)
                continue
            if k in query:
                raise InvalidRequest(f"query parameter {k!r} given twice", k)
            query[k] = v
        body = None
        if route.body:
            ctype = self.headers.get("Content-Type", JSON_TYPE).split(";")[0].strip().lower()
            if ctype != JSON_TYPE:
                raise HTTPError(415, f"request body must be {JSON_TYPE}, not {ctype}",
                                "Content-Type")
            if not raw:
                raise InvalidRequest("request body is required (a JSON object)")
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise InvalidRequest("request body must be a JSON object")
        elif raw:
            raise InvalidRequest(f"{self.command} {route.template} takes no request body")
        return route.handler(Request(self.command, url.path, params, query, body, self.cred,
                                     api.agent, api))

    def _send(self, resp: Response) -> None:
        body = resp.body
        stream: Iterator[bytes] | None = None
        if resp.status == 204 or body is None and resp.status != 200:
            payload = b""
        elif isinstance(body, bytes):
            payload = body
        elif isinstance(body, str) and resp.content_type != JSON_TYPE:
            payload = body.encode()
        elif isinstance(body, Iterator):
            payload, stream = b"", body
        else:
            payload = json.dumps(body).encode()
        try:
            self.send_response(resp.status)
            if resp.status != 204:
                self.send_header("Content-Type", resp.content_type)
            for k, v in resp.headers.items():
                self.send_header(k, v)
            if stream is not None:
                self.send_header("Transfer-Encoding", "chunked")
            elif resp.status != 204:
                self.send_header("Content-Length", str(len(payload)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if stream is not None:
                self._stream(stream)
            elif payload and self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            log.debug("peer %s went away during the response", self.address_string())

    def _stream(self, chunks: Iterator[bytes]) -> None:
        stopping = self.server.api.stopping
        try:
            for chunk in chunks:
                if stopping.is_set():
                    break
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False   # keep-alive connections must not hold up stop()
    api: "APIServer"


# ---------------------------------------------------------------- the server

class APIServer:
    """Serve ``agent`` on ``socket_path``. ``start()`` returns once the socket accepts."""

    def __init__(self, agent: AgentService, socket_path: str, group: str | None = "stockade",
                 mode: int = 0o660, routes: Iterable[Route] = ROUTES):
        self.agent, self.socket_path, self.group, self.mode = agent, str(socket_path), group, mode
        self.router = Router(routes)
        self.stopping = threading.Event()
        self._httpd: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_route(self, route: Route) -> None:
        self.router.add(route)

    def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise StockadeError(f"{self.socket_path} exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.socket_path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", self.socket_path)
            os.unlink(self.socket_path)
            return
        except OSError as exc:
            raise StockadeError(f"cannot check {self.socket_path}: {exc.strerror}") from exc
        finally:
            probe.close()
        raise StockadeError(f"another process is serving on {self.socket_path}; "
                            "is an agent already running?")

    def _secure_socket(self) -> None:
        gid = -1
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                log.warning("group %r does not exist; %s stays owned by the agent's group, "
                            "so only root can use it", self.group, self.socket_path)
        if gid != -1:
            os.chown(self.socket_path, -1, gid)
        os.chmod(self.socket_path, self.mode)

    def start(self) -> None:
        if self._httpd:
            raise RuntimeError("APIServer already started")
        os.makedirs(os.path.dirname(self.socket_path) or ".", exist_ok=True)
        self._remove_stale_socket()
        self.stopping.clear()
        # the socket is born 0600 so nobody connects before chmod/chown widen it
        old = os.umask(0o177)
        try:
            httpd = _UnixHTTPServer(self.socket_path, _Handler)
        except OSError as exc:
            raise StockadeError(f"cannot listen on {self.socket_path}: {exc.strerror}") from exc
        finally:
            os.umask(old)
        httpd.api = self
        try:
            self._secure_socket()
        except OSError as exc:
            httpd.server_close()
            raise StockadeError(f"cannot set owner/mode of {self.socket_path}: "
                                f"{exc.strerror}") from exc
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="stockade-api",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        log.info("API listening on %s", self.socket_path)

    def stop(self) -> None:
        if not self._httpd:
            return
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._httpd = self._thread = None

    def __enter__(self) -> "APIServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
