"""Fixtures for the web UI: the real API server over a unix socket with the real agent
behind it, in-process (its engine and reconciler over a recording datapath, plus canned
flows), an app wired to it, and a logged-in test client."""
from __future__ import annotations

import datetime as dt
import re

import pytest

from policydocs import ingress_policy
from recording_datapath import RecordingDatapath
from stockade.daemon.agent import Agent
from stockade.daemon.api import AgentAPI
from stockade.daemon.config import AgentConfig
from stockade.daemon.server import APIServer
from stockade_webui import create_app

TOKEN = "test-token-0123456789abcdef"

DB_POLICY = ingress_policy("db", "db", "web", 5432)
# The proposal: db only from api, so web -> db:5432 would be blocked.
PROPOSED = ingress_policy("db", "db", "api", 5432)


def _iso(seconds_ago: float) -> str:
    t = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds_ago)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def flow(src: dict, dst: dict, sport: int, dport: int, verdict="FORWARDED", ago=60.0,
         direction="ingress") -> dict:
    conn = f"tcp {src['ips'][0]}:{sport} -> {dst['ips'][0]}:{dport}"
    return {"time": _iso(ago), "verdict": verdict,
            "drop_reason": "policy_denied" if verdict == "DROPPED" else None,
            "reason": "policy", "direction": direction, "ip_version": 4,
            "ip": {"source": src["ips"][0], "destination": dst["ips"][0]},
            "l4": {"protocol": "tcp", "source_port": sport, "destination_port": dport},
            "is_reply": False, "interface": {"index": 7, "name": "veth-x"},
            "source": {"identity": src["identity"], "labels": sorted(f"{k}={v}" for k, v in src["labels"].items()),
                       "endpoint": {"name": src["name"], "host": "h1"}},
            "destination": {"identity": dst["identity"],
                            "labels": sorted(f"{k}={v}" for k, v in dst["labels"].items()),
                            "endpoint": {"name": dst["name"], "host": "h1"}},
            "policy": ["db"] if dport == 5432 else [], "policy_match": "allow", "size": 60,
            "connection": conn}


class FlowAgent(AgentAPI):
    """The real agent in-process (its real engine and reconciler, a recording datapath,
    no kernel) with canned flows: the pages ask it what the deployed agent would answer.
    Every API call is recorded in ``calls`` as (method, *args, *kwargs values)."""

    def __init__(self, state_dir: str):
        cfg = AgentConfig(state_dir=state_dir, host_name="h1", podman_socket=None,
                          docker_socket=None, podman_events_log=None)
        agent = Agent(cfg)
        agent.start(RecordingDatapath(), watch_links=False, watch_runtimes=False, flows=False)
        super().__init__(agent)
        self.flow_ring: list[dict] = []
        self.calls: list[tuple] = []
        for name in ("health", "list_endpoints", "add_endpoint", "remove_endpoint",
                     "list_identities", "list_ipcache", "list_policies", "put_policies",
                     "delete_policy", "trace", "matrix", "review", "list_services"):
            setattr(self, name, self._recorded(name, getattr(self, name)))

    def _recorded(self, name, fn):
        def call(*args, **kwargs):
            self.calls.append((name, *args, *kwargs.values()))
            return fn(*args, **kwargs)
        return call

    def flows(self, criteria: dict) -> dict:
        self.calls.append(("flows", criteria))
        out = list(self.flow_ring)
        for key, vals in criteria.items():
            vals = vals if isinstance(vals, list) else [vals]
            if key == "verdict":
                out = [f for f in out if f["verdict"] in vals]
            elif key == "port":
                out = [f for f in out if str(f["l4"]["destination_port"]) in vals
                       or str(f["l4"]["source_port"]) in vals]
            elif key in ("from_label", "to_label"):
                side = "source" if key == "from_label" else "destination"
                out = [f for f in out if any(all(any(l.endswith(":" + part) or l == part for l in f[side]["labels"])
                                                 for part in v.split(",")) for v in vals)]
        since = criteria.get("since")
        if since:
            since = since[0] if isinstance(since, list) else since
            secs = int(since[:-1]) * {"s": 1, "m": 60, "h": 3600}[since[-1]]
            out = [f for f in out if f["time"] >= _iso(secs)]
        last = criteria.get("last")
        if last:
            out = out[-int(last[0] if isinstance(last, list) else last):]
        return {"flows": out, "count": len(out), "connections": len({f["connection"] for f in out}),
                "events_lost": {"rate_limit_new": 0, "rate_limit_drop": 0, "ringbuf_full": 0},
                "buffer": {"size": len(self.flow_ring), "capacity": 1024}}


class _CannedFlows:
    """What the agent's review reads: the same canned flows as the pages."""

    def __init__(self, api: FlowAgent):
        self.api = api

    def query(self, criteria: dict) -> dict:
        return self.api.flows(criteria)


def populate(agent: FlowAgent) -> dict:
    web = agent.add_endpoint({"name": "web1", "interface": "vweb1", "ips": ["10.9.0.2"],
                              "labels": {"app": "web"}})
    db = agent.add_endpoint({"name": "db1", "interface": "vdb1", "ips": ["10.9.0.3"],
                             "labels": {"app": "db"}})
    api = agent.add_endpoint({"name": "api1", "interface": "vapi1", "ips": ["10.9.0.4"],
                              "labels": {"app": "api"}, "audit": False})
    agent.put_policies([{"name": "db.yaml", "text": DB_POLICY}])
    agent.agent.flow_source = _CannedFlows(agent)
    agent.flow_ring = [flow(web, db, 40000 + i, 5432, ago=30 + i) for i in range(12)]
    agent.flow_ring += [flow(api, db, 41000, 5432, verdict="DROPPED", ago=120)]
    agent.flow_ring += [flow(web, api, 42000, 8080, ago=7200)]   # older than an hour
    agent.flow_ring.sort(key=lambda f: f["time"])                # the ring is oldest first
    return {"web": web, "db": db, "api": api}


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """One agent for every test that does not change it (reviews are dry runs)."""
    a = FlowAgent(str(tmp_path_factory.mktemp("state")))
    populate(a)
    with APIServer(a, str(tmp_path_factory.mktemp("agent") / "agent.sock")) as s:
        yield a, s.socket_path


@pytest.fixture
def agent(shared_server):
    a, _ = shared_server
    a.calls.clear()
    return a


@pytest.fixture
def agent_socket(shared_server):
    return shared_server[1]


@pytest.fixture
def own_agent(tmp_path):
    """An agent of the test's own, to change freely: (agent, socket path)."""
    a = FlowAgent(str(tmp_path / "state"))
    populate(a)
    with APIServer(a, str(tmp_path / "agent.sock")) as s:
        yield a, s.socket_path


@pytest.fixture
def app(agent_socket):
    app = create_app({"TOKEN": TOKEN, "AGENTS": [f"h1={agent_socket}"], "TESTING": True,
                      "MAX_CONTENT_LENGTH": 64 * 1024, "MAX_FORM_MEMORY_SIZE": 64 * 1024})
    return app


@pytest.fixture
def client(app):
    return app.test_client()


class Auth:
    def __init__(self, client):
        self.client = client

    def csrf(self, path="/login") -> str:
        html = self.client.get(path).get_data(as_text=True)
        return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)

    def login(self, token=TOKEN):
        return self.client.post("/login", data={"token": token, "csrf_token": self.csrf()})


@pytest.fixture
def auth(client):
    return Auth(client)


@pytest.fixture
def logged_in(client, auth):
    r = auth.login()
    assert r.status_code == 302
    return client


@pytest.fixture
def auth_for():
    """A logged-in client for an app reading the given sockets."""
    def make(*sockets):
        app = create_app({"TOKEN": TOKEN, "AGENTS": list(sockets), "TESTING": True})
        c = app.test_client()
        html = c.get("/login").get_data(as_text=True)
        tok = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
        assert c.post("/login", data={"token": TOKEN, "csrf_token": tok}).status_code == 302
        return c
    return make
