"""Flow settings: config keys, datapath build settings, agent flags, metrics listener,
the client's repeated parameters and the observe CLI against a fake agent."""
from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from stockade.cli.main import cli
from stockade.client import Client
from stockade.daemon.config import AgentConfig
from stockade.daemon.metrics import listen_address
from stockade.errors import InvalidRequest


@pytest.mark.parametrize("value,expected", [
    ("on", ("127.0.0.1", 9962)), ("true", ("127.0.0.1", 9962)),
    (":9100", ("127.0.0.1", 9100)), ("0.0.0.0:9962", ("0.0.0.0", 9962)),
    ("[::1]:9962", ("::1", 9962)),
], ids=["on", "true", "port-only", "any", "v6"])
def test_metrics_listen_address(value, expected):
    assert listen_address(value) == expected


def test_metrics_listener_is_off_by_default():
    assert AgentConfig().metrics_listen is None
    assert AgentConfig().flow_log_path is None


def test_event_budgets_reach_the_datapath_build():
    s = AgentConfig(flow_events_rate=100, flow_events_burst=10, drop_events_rate=50,
                    drop_events_burst=5).validate().datapath_settings()
    assert (s["EVENTS_NEW_RATE"], s["EVENTS_NEW_BURST"], s["EVENTS_DROP_RATE"],
            s["EVENTS_DROP_BURST"]) == (100, 10, 50, 5)
    from stockade.datapath import render_source
    assert "#define EVENTS_DROP_RATE 50" in render_source(s)


@pytest.mark.parametrize("key,value", [
    ("drop_events_rate", 0), ("flow_events_burst", -1), ("flow_log_backups", -1),
    ("flow_log_max_bytes", -5),
])
def test_bad_flow_settings_are_refused(key, value):
    with pytest.raises(InvalidRequest):
        AgentConfig(**{key: value}).validate()


def test_agent_flags_cover_flow_settings():
    out = CliRunner().invoke(cli, ["agent", "--help"]).output
    for flag in ("--flow-log-path", "--flow-log-max-bytes", "--flow-log-backups",
                 "--flow-events-rate", "--drop-events-rate", "--metrics-listen"):
        assert flag in out


def _recording_client(seen):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params.multi_items())
        return httpx.Response(200, json={"flows": [], "count": 0, "connections": 0,
                                         "events_lost": {}, "buffer": {"size": 0, "capacity": 1}})
    return Client(transport=httpx.MockTransport(handler))


def test_client_repeats_list_filters():
    seen = []
    with _recording_client(seen) as c:
        c.flows(verdict=["DROPPED", "AUDIT"], from_label="app=web,tier=front", port=5432,
                last=5, to_ip=None)
    assert seen[0] == [("verdict", "DROPPED"), ("verdict", "AUDIT"),
                       ("from_label", "app=web,tier=front"), ("port", "5432"), ("last", "5")]


def test_observe_sends_filters_and_defaults_to_last_20():
    seen = []
    transport = httpx.MockTransport(lambda r: (seen.append(r.url.params.multi_items()), httpx.Response(
        200, json={"flows": [], "count": 0, "connections": 0, "events_lost": {},
                   "buffer": {"size": 0, "capacity": 1}}))[1])
    r = CliRunner().invoke(cli, ["observe", "--verdict", "dropped", "--from-label", "app=web",
                                 "--from-label", "app=api", "--port", "5432"],
                           obj={"transport": transport})
    assert r.exit_code == 0, r.output
    assert seen[0] == [("verdict", "DROPPED"), ("from_label", "app=web"),
                       ("from_label", "app=api"), ("port", "5432"), ("last", "20")]


def test_observe_json_lines():
    flow = {"time": "2026-01-01T00:00:00.000000Z", "verdict": "DROPPED",
            "drop_reason": "policy_denied", "direction": "ingress", "ip_version": 4,
            "ip": {"source": "10.0.0.1", "destination": "10.0.0.2"},
            "l4": {"protocol": "tcp", "source_port": 4000, "destination_port": 5432,
                   "tcp_flags": ["SYN"]},
            "source": {"identity": 1001, "labels": ["k8s:app=web"],
                       "endpoint": {"name": "web", "host": "h"}},
            "destination": {"identity": 1002, "labels": ["k8s:app=db"], "endpoint": None},
            "policy": [], "policy_match": "default-deny"}
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={
        "flows": [flow, flow], "count": 2, "connections": 1, "events_lost": {},
        "buffer": {"size": 2, "capacity": 10}}))
    r = CliRunner().invoke(cli, ["observe", "-o", "json"], obj={"transport": transport})
    assert [json.loads(l) for l in r.output.splitlines()] == [flow, flow]
    r = CliRunner().invoke(cli, ["observe", "--color", "always"], obj={"transport": transport})
    assert "\x1b[" in r.output and "10.0.0.1:4000 web (app=web) [1001] -> 10.0.0.2:5432" in r.output
    r = CliRunner().invoke(cli, ["observe"], obj={"transport": transport})
    assert "\x1b[" not in r.output and "policy_denied" in r.output
