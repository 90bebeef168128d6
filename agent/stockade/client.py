"""The one client of the agent's API; the CLI, web UI and Ansible modules all use it.

    StockadeError (stockade.errors)
     ├── PolicyErrors             put_policies() could not read a policy file it was given
     └── ClientError              a call did not succeed
          ├── AgentUnreachable    no answer: the socket is missing, refused, timed out or
          │                       the reply was not HTTP
          └── APIError            the agent answered with an error status; ``status``,
                                  ``field`` and ``errors`` come from its error body and
                                  ``str()`` is the agent's message

The agent's unix socket is spoken to with the standard library's http.client (importing
httpx costs more than the whole of ``stockade status`` may take). Tests and in-process
users pass ``transport=`` (an ``httpx.MockTransport``, or any ``httpx.BaseTransport``)
instead of a socket path; httpx is imported only then. Transport exceptions never leave
this module: they are translated here with ``raise ... from exc``, so the original stays
attached as ``__cause__``.

    with Client() as c:                       # $STOCKADE_SOCKET or /run/stockade/agent.sock
        c.put_policies(["web.yaml"], dry_run=True)["diff"]
"""
from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator
from urllib.parse import quote, urlencode

from .errors import PolicyError, PolicyErrors, StockadeError

if TYPE_CHECKING:
    import httpx

DEFAULT_SOCKET = "/run/stockade/agent.sock"
DEFAULT_TIMEOUT = 30.0


def default_socket() -> str:
    return os.environ.get("STOCKADE_SOCKET") or DEFAULT_SOCKET


class ClientError(StockadeError):
    """A call to the agent did not succeed."""


class AgentUnreachable(ClientError):
    """The agent could not be reached or gave no usable answer."""


class APIError(ClientError):
    """The agent refused the request; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 errors: list[dict] | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.errors = status, field, errors or []
        self.body = body if body is not None else {"message": message, "field": field}

    def to_dict(self) -> dict:
        """The agent's own error object, so ``-o json`` shows exactly what it said."""
        return dict(self.body)


def _segment(value: str) -> str:
    return quote(value, safe="")


class _Reply:
    """What the client reads of an answer (the part of httpx.Response it uses)."""

    def __init__(self, status_code: int, reason_phrase: str, content: bytes):
        self.status_code, self.reason_phrase, self.content = status_code, reason_phrase, content

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float | None):
        super().__init__("stockade", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _UnixHTTP:
    """HTTP/1.1 to the agent's socket, one connection per request."""

    def __init__(self, socket_path: str, timeout: float):
        self.socket_path, self.timeout = socket_path, timeout

    def open(self, method: str, target: str, body: Any, read_timeout: float | None
             ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        """Raises OSError (TimeoutError when it timed out) or http.client.HTTPException."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, target, body=data, headers=headers)
            if conn.sock is not None:
                conn.sock.settimeout(read_timeout)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def request(self, method: str, target: str, body: Any) -> _Reply:
        conn, resp = self.open(method, target, body, self.timeout)
        try:
            return _Reply(resp.status, resp.reason, resp.read())
        finally:
            conn.close()


def _target(path: str, params: dict | list | None) -> str:
    return f"{path}?{urlencode(params)}" if params else path


class Client:
    def __init__(self, socket_path: str | None = None, transport: httpx.BaseTransport | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        self.socket_path = socket_path or default_socket()
        self.where = self.socket_path if transport is None else "(in-process transport)"
        self._unix = _UnixHTTP(self.socket_path, timeout) if transport is None else None
        self._http: Any = None
        if transport is not None:
            import httpx

            self._http = httpx.Client(transport=transport, base_url="http://stockade",
                                      timeout=timeout)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- plumbing
    def _unreachable(self, exc: Exception, timed_out: bool) -> AgentUnreachable:
        if timed_out:
            return AgentUnreachable(f"the agent at {self.where} did not answer in time: {exc}")
        return AgentUnreachable(f"cannot reach the agent at {self.where}: {exc}")

    def _request(self, method: str, path: str, *, params: dict | list | None = None,
                 json: Any = None) -> _Reply:
        if isinstance(params, dict):
            params = {k: ("true" if v is True else "false" if v is False else v)
                      for k, v in params.items() if v is not None}
        if self._unix is not None:
            try:
                resp = self._unix.request(method, _target(path, params), json)
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc, isinstance(exc, TimeoutError)) from exc
        else:
            import httpx

            try:
                r = self._http.request(method, path, params=params or None, json=json)
            except httpx.TransportError as exc:
                raise self._unreachable(exc, isinstance(exc, httpx.TimeoutException)) from exc
            resp = _Reply(r.status_code, r.reason_phrase, r.content)
        if resp.is_success:
            return resp
        raise self._api_error(resp)

    @staticmethod
    def _api_error(resp: _Reply) -> APIError:
        try:
            err = resp.json()["error"]
            if not isinstance(err, dict) or not isinstance(err.get("message"), str):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            text = resp.text.strip()[:200] or resp.reason_phrase
            return APIError(resp.status_code, f"agent answered HTTP {resp.status_code}: {text}")
        return APIError(resp.status_code, err["message"], err.get("field"), err.get("errors"),
                        body=err)

    def _json(self, method: str, path: str, **kw) -> Any:
        resp = self._request(method, path, **kw)
        try:
            return resp.json()
        except ValueError as exc:
            raise AgentUnreachable(f"the agent at {self.where} sent a reply that is not "
                                   f"JSON for {method} {path}") from exc

    # ---------------------------------------------------------------- the API
    def health(self) -> dict:
        return self._json("GET", "/v1/health")

    def endpoints(self) -> list[dict]:
        return self._json("GET", "/v1/endpoints")

    def add_endpoint(self, *, name: str, interface: str | None = None, ips: list[str],
                     labels: dict | str | None = None, audit: bool | None = None,
                     mac: str | None = None) -> dict:
        spec: dict[str, Any] = {"name": name, "ips": list(ips)}
        if interface is not None:
            spec["interface"] = interface
        if mac is not None:
            spec["mac"] = mac
        if labels is not None:
            spec["labels"] = labels
        if audit is not None:
            spec["audit"] = audit
        return self._json("POST", "/v1/endpoints", json=spec)

    def remove_endpoint(self, name: str) -> None:
        self._request("DELETE", f"/v1/endpoints/{_segment(name)}")

    def identities(self) -> list[dict]:
        return self._json("GET", "/v1/identities")

    def ipcache(self) -> list[dict]:
        return self._json("GET", "/v1/ipcache")

    def add_ipcache(self, prefix: str, labels: dict, host: str | None = None) -> dict:
        return self._json("POST", "/v1/ipcache",
                          json={"prefix": prefix, "labels": labels, "host": host})

    def add_ipcache_entries(self, entries: list[dict]) -> dict:
        """Many ``{"prefix", "labels", "host", "node"}`` in one transaction:
        {"entries": given, "changed": n}."""
        return self._json("PATCH", "/v1/ipcache", json={"entries": list(entries)})

    def remove_ipcache(self, prefix: str) -> None:
        self._request("DELETE", f"/v1/ipcache/{_segment(prefix)}")

    def policies(self) -> list[dict]:
        return self._json("GET", "/v1/policies")

    @staticmethod
    def _files(files: Iterable[str | os.PathLike | dict]) -> list[dict]:
        """Paths (read here; the name sent is the path as given) or ``{"name", "text"}``."""
        body = []
        for f in files:
            if isinstance(f, dict):
                body.append({"name": f["name"], "text": f["text"]})
                continue
            from .policy.api.safeload import ReadError, read_file

            try:
                body.append({"name": str(f), "text": read_file(Path(f))})
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise PolicyErrors([PolicyError("", f"cannot read: {reason}", file=str(f))]) from exc
            except ReadError as exc:  # too large, or not UTF-8
                raise PolicyErrors([PolicyError("", exc.msg, file=str(f))]) from None
        return body

    def put_policies(self, files: Iterable[str | os.PathLike | dict], *, replace_all: bool = False,
                     dry_run: bool = False) -> dict:
        """Returns the agent's PolicyResult."""
        return self._json("PUT", "/v1/policies", json={"files": self._files(files)},
                          params={"replace_all": replace_all, "dry_run": dry_run})

    def trace(self, src: str, dst: str, dport: str) -> dict:
        """The live trace: SELs as the CLI's (``endpoint:NAME`` too), ``dport`` like 80/tcp."""
        return self._json("GET", "/v1/trace", params={"src": src, "dst": dst, "dport": dport})

    def matrix(self, *, label: str | None = None, port: str | None = None,
               offset: int | None = None, limit: int | None = None,
               dst_offset: int | None = None, dst_limit: int | None = None,
               cidrs: bool | str | None = None) -> dict:
        if isinstance(cidrs, str):
            cidrs = cidrs.lower() == "true"
        return self._json("GET", "/v1/matrix", params={"label": label, "port": port,
                                                        "offset": offset, "limit": limit,
                                                        "dst_offset": dst_offset,
                                                        "dst_limit": dst_limit, "cidrs": cidrs})

    def review(self, files: Iterable[str | os.PathLike | dict], *, replace_all: bool = False) -> dict:
        """The agent's plan of a proposed policy set, discarded: never changes anything."""
        return self._json("POST", "/v1/review", json={"files": self._files(files),
                                                       "replace_all": replace_all})

    def delete_policy(self, name: str, namespace: str | None = None, kind: str | None = None,
                      *, dry_run: bool = False) -> dict:
        return self._json("DELETE", f"/v1/policies/{_segment(name)}",
                          params={"namespace": namespace, "kind": kind, "dry_run": dry_run})

    def delete_all_policies(self, *, dry_run: bool = False) -> dict:
        return self._json("DELETE", "/v1/policies", params={"dry_run": dry_run})

    def metrics(self) -> str:
        return self._request("GET", "/v1/metrics").text

    def services(self) -> dict:
        """{"services": [...], "conflicts": [...]}"""
        return self._json("GET", "/v1/services")

    def put_services(self, services: dict, *, dry_run: bool = False) -> dict:
        return self._json("PUT", "/v1/services", params={"dry_run": dry_run},
                          json={"services": services})

    # ---------------------------------------------------------------- flows
    @staticmethod
    def _flow_params(filters: dict) -> list[tuple[str, str | int | float | bool | None]]:
        """filters: {key: value or list of values}; a list repeats the parameter (OR)."""
        out: list[tuple[str, str | int | float | bool | None]] = []
        for k, v in filters.items():
            if v is None or v == [] or v == ():
                continue
            for item in (v if isinstance(v, (list, tuple, set, frozenset)) else [v]):
                out.append((k, "true" if item is True else "false" if item is False else str(item)))
        return out

    def flows(self, **filters) -> dict:
        """Recent flows (a FlowList, see daemon/contract.py). Filters: verdict, drop_reason,
        direction, protocol, port, from_port, to_port, identity, from_identity, to_identity,
        ip, from_ip, to_ip, label, from_label, to_label, endpoint, from_endpoint,
        to_endpoint (each a value or a list: OR), since, last.

            c.flows(verdict="DROPPED", from_label=["app=web", "app=api"], last=20)
        """
        return self._json("GET", "/v1/flows", params=self._flow_params(filters))

    def follow_flows(self, **filters) -> Iterator[dict]:
        """Flows as the agent decodes them (after the ``last`` newest matches, if given),
        until the caller stops iterating or the agent goes away. Same filters as flows()."""
        params = self._flow_params({**filters, "follow": True})
        if self._unix is None:
            yield from self._follow_httpx(params)
            return
        try:
            conn, resp = self._unix.open("GET", _target("/v1/flows", params), None, None)
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc, isinstance(exc, TimeoutError)) from exc
        try:
            if not 200 <= resp.status < 300:
                raise self._api_error(_Reply(resp.status, resp.reason, resp.read()))
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        except (OSError, http.client.HTTPException) as exc:
            raise AgentUnreachable(f"flow stream from the agent at {self.where} ended: "
                                   f"{exc}") from exc
        finally:
            conn.close()

    def _follow_httpx(self, params: list) -> Iterator[dict]:
        import httpx

        try:
            with self._http.stream("GET", "/v1/flows", params=params,
                                   timeout=httpx.Timeout(None, connect=self._http.timeout.connect)) as resp:
                if not resp.is_success:
                    resp.read()
                    raise self._api_error(_Reply(resp.status_code, resp.reason_phrase,
                                                 resp.content))
                for line in resp.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise AgentUnreachable(f"flow stream from the agent at {self.where} ended: "
                                   f"{exc}") from exc
