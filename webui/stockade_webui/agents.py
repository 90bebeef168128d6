"""The agents the UI reads, each through stockade.client.Client on its unix socket.

Config ``AGENTS`` is a list of sockets: ``"/run/stockade/agent.sock"`` or
``"web1=/run/stockade-web1/agent.sock"`` (a name for the host, else the socket's
directory name, or this machine's hostname for the default socket). Tests set
``CLIENT_FACTORY`` (socket path -> Client) to use an in-process transport.

One Client per host is opened lazily per request on ``g`` and closed at teardown.
An agent that does not answer never fails a page: its host shows the error instead.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import socket as _socket
from dataclasses import dataclass, field
from pathlib import Path

from flask import current_app, g

from stockade.client import DEFAULT_SOCKET, Client, ClientError

UI_TIMEOUT = 5.0


@dataclass(frozen=True)
class AgentRef:
    name: str
    socket: str


def parse_agents(values) -> list[AgentRef]:
    out = []
    for v in values:
        if isinstance(v, AgentRef):
            out.append(v)
            continue
        name, sep, path = str(v).partition("=")
        if not sep:
            path = name
            name = (_socket.gethostname() if path == DEFAULT_SOCKET
                    else Path(path).parent.name or path)
        out.append(AgentRef(name, path))
    seen = set()
    for a in out:
        if a.name in seen:
            raise ValueError(f"two agents are named {a.name!r}; name them NAME=SOCKET")
        seen.add(a.name)
    return out


@dataclass
class Host:
    """One agent and what this request has read from it (each call at most once)."""

    ref: AgentRef
    client: Client
    errors: list[str] = field(default_factory=list)
    _cache: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.ref.name

    def get(self, what: str, default=None):
        """``what``: health, endpoints, identities, ipcache, policies. Errors are
        recorded on the host, and ``default`` returned."""
        if what not in self._cache:
            try:
                self._cache[what] = getattr(self.client, what)()
            except ClientError as exc:
                msg = str(exc)
                if msg not in self.errors:
                    self.errors.append(msg)
                self._cache[what] = default
        return self._cache[what]

    def call(self, what: str, **kwargs):
        """``client.what(**kwargs)``, once per request; an error is recorded on the host
        and None returned."""
        key = (what, tuple(sorted(kwargs.items())))
        if key not in self._cache:
            try:
                self._cache[key] = getattr(self.client, what)(**kwargs)
            except ClientError as exc:
                if str(exc) not in self.errors:
                    self.errors.append(str(exc))
                self._cache[key] = None
        return self._cache[key]

    @property
    def reachable(self) -> bool:
        return self.get("health") is not None

    def flows_supported(self) -> bool:
        return callable(getattr(self.client, "flows", None))

    def flows(self, **filters) -> list[dict] | None:
        """Flows matching ``stockade observe`` filters (lists of values, ``since``,
        ``last``); None (and an error on the host) when the agent cannot give them."""
        fn = getattr(self.client, "flows", None)
        if not callable(fn):
            msg = "this agent's client has no flows API (flow visibility is not installed)"
            if msg not in self.errors:
                self.errors.append(msg)
            return None
        filters = {k: v for k, v in filters.items() if v not in (None, "", [], ())}
        try:
            params = inspect.signature(fn).parameters
            if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
                filters = {k: v for k, v in filters.items() if k in params}
        except (TypeError, ValueError):
            pass
        key = ("flows", tuple(sorted((k, str(v)) for k, v in filters.items())))
        if key not in self._cache:
            try:
                got = fn(**filters)
                self._cache[key] = list(got.get("flows", [])) if isinstance(got, dict) else list(got)
            except ClientError as exc:
                self.errors.append(f"flows: {exc}")
                self._cache[key] = None
        return self._cache[key]


def init_app(app) -> None:
    app.config["AGENT_REFS"] = parse_agents(app.config.get("AGENTS") or [DEFAULT_SOCKET])
    app.teardown_appcontext(_close)


def hosts() -> list[Host]:
    if "stockade_hosts" not in g:
        factory = current_app.config.get("CLIENT_FACTORY") or (
            lambda path: Client(path, timeout=UI_TIMEOUT))
        g.stockade_hosts = [Host(ref, factory(ref.socket)) for ref in current_app.config["AGENT_REFS"]]
    return g.stockade_hosts


def host(name: str | None) -> Host:
    """The host named ``name`` (the first one when None or empty); 404 for unknown."""
    from flask import abort
    hs = hosts()
    if not name:
        return hs[0]
    for h in hs:
        if h.name == name:
            return h
    abort(404, f"no agent named {name!r}")


def _close(exc=None) -> None:
    for h in g.pop("stockade_hosts", []):
        try:
            h.client.close()
        except Exception:  # closing is best effort; the request is over
            pass


def iso_ago(seconds: float) -> str:
    t = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{t.microsecond:06d}Z"
