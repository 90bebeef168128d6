"""The agent's HTTP/1.1 JSON API on a unix socket: a thin translation of AgentService.

Who may do what. The socket file is ``mode`` (0660) and owned by ``root:<group>``, so
the file system decides who can connect at all. The peer's uid is read with
SO_PEERCRED when it connects. Members of the group (any uid but 0) may call the
read-only routes: every GET (trace and matrix included), POST /v1/review, and the dry
runs (PUT /v1/policies, PUT /v1/services, DELETE /v1/policies[/{name}] with
``dry_run=true``). Everything else changes state and needs uid 0; otherwise 403. The
permission table is ``Route.access`` in daemon/routes.py.

Before any body is read. The request line and headers are parsed (http.server), then
the route is matched (404, 405), the permission decided from method, path and query
(403), the query validated (400), and the body's framing and size judged from its
headers: Content-Length only (chunked: 411), at most 4 MiB from a member and only to a
read-only route, at most 64 MiB from root (413), JSON (415). Only then is the body read,
incrementally, with the limit enforced as it comes. A request refused before its body
was read is answered and its connection closed, the body unread (a body of at most 64
KiB is read and dropped for up to 1 s first, so its sender sees the answer). ``Expect:
100-continue`` is answered only once the body is wanted.

Limits and timeouts (connections.Limits). The request line and headers must arrive
within 10 s and 64 KiB (431), a body within 10 s plus 1 s per MiB (408); every read has
a deadline for its whole phase, so a peer that sends a byte a second is cut off. A
response write that does not finish in 30 s ends the connection. An idle keep-alive
connection is closed after 60 s. Connections are counted per uid (a member uid 32, all
members 128, root 256; over it: 503 and closed at once) and served by a pool of 12
workers, of which members' requests may hold at most 8 at once and one member uid at
most 4: root always finds a worker. An idle connection holds no worker.

Validation. Bodies and query parameters are checked against docs/api/openapi.yaml
(daemon/apischema.py): unknown keys and parameters, wrong types and missing keys are 400
with ``field`` the key path (``files[0].text``). Errors go out as ``{"error":
{"message", "field", ...}}`` with the error class's ``http_status`` (errors.py). Anything
that is not a StockadeError is logged with its traceback and answered with a generic
500: its text may describe internal state and is not for the peer.

Streaming. A handler may return ``Response(body=<iterator of bytes>)``; it is sent with
``Transfer-Encoding: chunked``, one chunk per item, flushed as it comes, and ends when
the iterator does, when the peer goes away or stops reading, or when the server stops
(``APIServer.stopping`` is set; long-running iterators should check it between items).
A stream leaves the worker pool for its own thread, counted against its uid's streams
(a member uid 4, all members 16, root 32; over it: 503), so followers never starve the
pool. ``GET /v1/flows?follow=true`` is such a route.
"""
from __future__ import annotations

import grp
import http.server
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..errors import HTTPError, InvalidRequest, StockadeError
from .apischema import ApiSchema, api_schema
from .changelog import acting
from .connections import Acceptor, Connection, HeadersTooLarge, Limits, WorkerPool
from .contract import AgentService
from .routes import JSON_TYPE, ROUTES, Access, Grant, PeerCred, Request, Response, Route, Router, grant

__all__ = ["APIServer", "Access", "Grant", "HTTPError", "Limits", "PeerCred", "Request",
           "Response", "Route", "ROUTES", "grant", "peer_cred", "status_for"]

log = logging.getLogger(__name__)

BODY_CHUNK = 64 * 1024


def status_for(exc: BaseException) -> int:
    """HTTP status of an error: its class's (or an HTTPError's own) ``http_status``."""
    return getattr(exc, "http_status", 500) if isinstance(exc, StockadeError) else 500


def error_body(exc: StockadeError) -> dict:
    return {"error": exc.to_dict()}


def peer_cred(sock: socket.socket) -> PeerCred | None:
    """SO_PEERCRED of a connected unix socket; None where the kernel gives none."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return PeerCred(*struct.unpack("3i", raw))


# ---------------------------------------------------------------- one request

class _Exchange(http.server.BaseHTTPRequestHandler):
    """One request on a Connection: http.server's parsing, the connection's I/O."""

    protocol_version = "HTTP/1.1"
    server_version = "stockade-agent"
    sys_version = ""

    def __init__(self, conn: Connection, api: "APIServer"):
        # not the base __init__: that would serve the whole connection at once
        self.conn, self.api, self.cred = conn, api, conn.cred
        self.connection = self.request = conn.sock
        self.server = api  # type: ignore[assignment]
        self.rfile, self.wfile = conn.rfile, conn.wfile  # type: ignore[assignment]
        self.close_connection = True
        self.body_unread = False
        self.expect_continue = False
        self.command = self.path = self.requestline = ""
        self.request_version = self.default_request_version

    def declared_length(self) -> int:
        """The request's Content-Length (no headers yet, chunked or unreadable: huge)."""
        try:
            return int(self.headers.get("Content-Length", ""))
        except (AttributeError, ValueError):
            return 1 << 62

    def address_string(self):
        return f"pid={self.cred.pid},uid={self.cred.uid}" if self.cred else "unknown peer"

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        log.debug("%s %s", self.address_string(), format % args)

    def handle_expect_100(self):
        self.expect_continue = True  # answered by _read_body, once the body is wanted
        return True

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

    def _dispatch(self):
        self.conn.raw.deadline = self.conn.raw.budget = None  # the headers are in
        self.body_unread = bool(self.headers.get("Transfer-Encoding")) or \
            self.headers.get("Content-Length", "0").strip() not in ("", "0")
        try:
            resp = self._handle()
        except StockadeError as exc:
            status = status_for(exc)
            if status >= 500:
                log.error("%s %s failed: %s", self.command, self.path, exc)
            resp = Response(status, error_body(exc), headers=getattr(exc, "headers", {}))
        except Exception:  # noqa: BLE001 - the boundary: log it, tell the peer nothing
            log.exception("%s %s: unexpected error", self.command, self.path)
            resp = Response(500, {"error": {"message": "internal error in the agent; "
                                            "see its log", "field": None}})
        if self.body_unread:
            self.close_connection = True  # the body is still in the socket
        self._send(resp)

    def _handle(self) -> Response:
        api = self.api
        url = urlsplit(self.path)
        route, params = api.router.match(self.command, url.path)
        try:
            pairs = parse_qsl(url.query, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise InvalidRequest("query string is not valid UTF-8") from None
        op = api.schema.operation(route.method, route.template)
        allowed = grant(route, pairs, self.cred, api.limits, op.body is not None)
        query = op.query(pairs)
        body = self._body(route, op, allowed)
        with acting(self.cred):
            return route.handler(Request(self.command, url.path, params, query, body, self.cred,
                                         api.agent, api))

    def _body(self, route: Route, op, allowed: Grant) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        lengths = set(self.headers.get_all("Content-Length") or [])
        if len(lengths) > 1:
            raise HTTPError(400, "Content-Length given twice", "Content-Length")
        raw = lengths.pop().strip() if lengths else "0"
        if not raw.isdigit():
            raise HTTPError(400, f"bad Content-Length: {raw!r}", "Content-Length")
        length = int(raw)
        if op.body is None:
            if length:
                raise InvalidRequest(f"{route.method} {route.template} takes no request body")
            return None
        if length > allowed.max_body:
            who = "root" if self.cred is not None and self.cred.uid == 0 else "a non-root peer"
            raise HTTPError(413, f"request body of {length} bytes is over the limit of "
                                 f"{allowed.max_body} bytes for {who}")
        ctype = self.headers.get("Content-Type", JSON_TYPE).split(";")[0].strip().lower()
        if ctype != JSON_TYPE:
            raise HTTPError(415, f"request body must be {JSON_TYPE}, not {ctype}", "Content-Type")
        if not length:
            raise InvalidRequest("request body is required (a JSON object)")
        data = self._read_body(length)
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidRequest("request body is nested too deeply") from None
        except ValueError as exc:  # e.g. an integer over 4,300 digits
            raise InvalidRequest(f"request body cannot be read: {exc}") from None
        del data
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        op.check_body(body)
        return body

    def _read_body(self, length: int) -> bytearray:
        """The body, as it comes, within its deadline (408 after it)."""
        if self.expect_continue:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        seconds = self.api.limits.body_deadline(length)
        self.conn.raw.deadline = time.monotonic() + seconds
        buf = bytearray()
        try:
            while len(buf) < length:
                chunk = self.rfile.read1(min(BODY_CHUNK, length - len(buf)))
                if not chunk:
                    raise HTTPError(400, f"the connection ended after {len(buf)} of "
                                         f"{length} body bytes")
                buf += chunk
        except TimeoutError:
            raise HTTPError(408, f"request body not received within {seconds:.0f} s "
                                 f"({len(buf)} of {length} bytes came)") from None
        finally:
            self.conn.raw.deadline = None
        self.body_unread = False
        return buf

    # ---------------------------------------------------------------- responses
    def _send(self, resp: Response) -> None:
        body = resp.body
        stream: Iterator[bytes] | None = None
        if isinstance(body, Iterator):
            try:
                assert self.api.pool is not None  # the server is running
                self.api.pool.begin_stream(self.conn)
                stream = body
            except HTTPError as exc:
                close = getattr(body, "close", None)
                if close:
                    close()
                self.close_connection = True
                resp, body = Response(503, error_body(exc)), error_body(exc)
        if resp.status == 204 or body is None and resp.status != 200 or stream is not None:
            payload = b""
        elif isinstance(body, (bytes, bytearray)):
            payload = bytes(body)
        elif isinstance(body, str) and resp.content_type != JSON_TYPE:
            payload = body.encode()
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
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            self.close_connection = True
            log.debug("peer %s went away or stopped reading: %s", self.address_string(), exc)

    def _stream(self, chunks: Iterator[bytes]) -> None:
        stopping = self.api.stopping
        try:
            for chunk in chunks:
                if stopping.is_set():
                    break
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()


# ---------------------------------------------------------------- the server

class APIServer:
    """Serve ``agent`` on ``socket_path``. ``start()`` returns once the socket accepts."""

    def __init__(self, agent: AgentService, socket_path: str, group: str | None = "stockade",
                 mode: int = 0o660, routes: Iterable[Route] = ROUTES,
                 limits: Limits | None = None, schema: ApiSchema | None = None):
        self.agent, self.socket_path, self.group, self.mode = agent, str(socket_path), group, mode
        self.router = Router(routes)
        self.limits = limits or Limits()
        self.schema = schema or api_schema()
        self.stopping = threading.Event()
        self.pool: WorkerPool | None = None
        self._listener: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._thread: threading.Thread | None = None
        self._refusals: dict[int, float] = {}

    def add_route(self, route: Route) -> None:
        self.router.add(route)

    # ---------------------------------------------------------------- connections
    def _accept(self, sock: socket.socket) -> Connection | None:
        conn = Connection(sock, peer_cred(sock), self.limits)
        assert self.pool is not None  # started: start() made it before accepting
        why = self.pool.admit(conn)
        if why is None:
            return conn
        self._log_refusal(conn.uid, why)
        body = json.dumps({"error": {"message": f"too many connections: {why}",
                                     "field": None}}).encode()
        try:  # a short answer fits in the socket buffer; never wait for this peer
            sock.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
                      socket.MSG_DONTWAIT)
        except OSError:
            pass
        sock.close()
        return None

    def _log_refusal(self, uid: int, why: str) -> None:
        now = time.monotonic()
        if now - self._refusals.get(uid, -60.0) >= 10.0:  # at most one line per uid per 10 s
            self._refusals[uid] = now
            log.warning("API: refusing a connection: %s", why)

    def _serve(self, conn: Connection) -> None:
        """One request on ``conn`` (a worker's job); then park it or close it."""
        conn.raw.deadline = time.monotonic() + self.limits.header_timeout
        conn.raw.budget = self.limits.header_bytes
        ex = _Exchange(conn, self)
        try:
            ex.handle_one_request()
        except HeadersTooLarge:
            ex.close_connection = True
            conn.raw.budget = None
            ex.send_error(431, f"request line and headers are over "
                               f"{self.limits.header_bytes} bytes")
        except OSError as exc:
            log.debug("connection of %s: %s", ex.address_string(), exc)
            ex.close_connection = True
        finally:
            conn.raw.deadline = conn.raw.budget = None
        if ex.close_connection or self.stopping.is_set() or self._acceptor is None:
            if ex.body_unread and ex.declared_length() <= self.limits.linger_bytes:
                conn.linger(self.limits.linger_bytes, self.limits.linger_timeout)
            conn.close()
        else:
            self._acceptor.park(conn)

    # ---------------------------------------------------------------- the socket
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

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # the socket is born 0600 so nobody connects before chmod/chown widen it
        old = os.umask(0o177)
        try:
            sock.bind(self.socket_path)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise StockadeError(f"cannot listen on {self.socket_path}: {exc.strerror}") from exc
        finally:
            os.umask(old)
        try:
            self._secure_socket()
        except OSError as exc:
            sock.close()
            raise StockadeError(f"cannot set owner/mode of {self.socket_path}: "
                                f"{exc.strerror}") from exc
        return sock

    def start(self) -> None:
        if self._listener:
            raise RuntimeError("APIServer already started")
        os.makedirs(os.path.dirname(self.socket_path) or ".", exist_ok=True)
        self._remove_stale_socket()
        self.stopping.clear()
        self._listener = self._listen()
        self.pool = WorkerPool(self.limits, self._serve)
        self.pool.start()
        self._acceptor = Acceptor(self._listener, self.pool, self.limits, self._accept)
        self._thread = threading.Thread(target=self._acceptor.run, name="stockade-api",
                                        daemon=True)
        self._thread.start()
        log.info("API listening on %s", self.socket_path)

    def stop(self) -> None:
        if not self._listener:
            return
        self.stopping.set()
        if self._acceptor:
            self._acceptor.stop()
        if self._thread:
            self._thread.join(timeout=5)
        self._listener.close()
        if self.pool is not None:
            self.pool.stop()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._listener = self._thread = self._acceptor = None

    def __enter__(self) -> "APIServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
