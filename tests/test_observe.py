"""Hubble-grade observe: --not, --until, --first, the new port/identity/endpoint filters,
-o compact and -o jsonpb (Hubble's flow JSON), and --since with -f printing the history
first. Filters on a ring of decoded events; the CLI against a recording transport and
against the real flow source's follow."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from click.testing import CliRunner

from stockade.cli.main import cli
from stockade.datapath import maps as m
from stockade.errors import InvalidRequest
from stockade.flows import Decoder, FlowFilter, FlowRing
from stockade.flows.hubble import compact, to_jsonpb
from test_flows_records import A4, B4, DB, WEB, WORLD, X4, raw_event, resolver, select
from test_flows_records import ring as ring  # noqa: F401  (the fixture)

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("criteria,expected", [
    ({"not_verdict": "FORWARDED"}, 3),
    ({"not_verdict": ["FORWARDED", "AUDIT"]}, 2),
    ({"not_verdict": "FORWARDED", "to_port": 5432}, 1),
    ({"not_from_label": "app=web"}, 2),
    ({"not_to_endpoint": "db"}, 1),
    ({"not_protocol": "tcp"}, 2),
    ({"from_port": 40000}, 5),
    ({"to_port": 5433}, 1),
    ({"not_to_port": 5432}, 3),
    ({"from_identity": WORLD}, 1),
    ({"to_identity": WEB}, 1),
    ({"not_identity": WORLD}, 5),
    ({"from_endpoint": "web"}, 4),
    ({"endpoint": "web"}, 5),
    ({"first": 2}, 2),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_new_filters(ring, criteria, expected):
    got = FlowFilter.parse({k: v if isinstance(v, list) or k in ("first",) else [v]
                            for k, v in criteria.items()}).select(ring)
    assert len(got) == expected


def _select(ring, **criteria):
    return [ring.to_dict(r) for r in FlowFilter.parse(criteria).select(ring)]


def test_first_keeps_oldest_and_until_cuts(ring):
    rows = select(ring)
    assert _select(ring, first=1) == rows[:1]
    assert _select(ring, first=2, verdict=["DROPPED"]) == select(ring, verdict="DROPPED")[:2]
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    assert _select(ring, until=past) == [] and _select(ring, until=past, first=3) == []
    assert len(_select(ring, until="0s")) == 6
    with pytest.raises(InvalidRequest, match="first or last"):
        FlowFilter.parse({"first": 1, "last": 1})
    with pytest.raises(InvalidRequest) as err:
        FlowFilter.parse({"until": "soon"})
    assert err.value.field == "until"


def _transport(seen, flows=()):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params.multi_items())
        if request.url.params.get("follow") == "true":
            return httpx.Response(200, content="".join(json.dumps(f) + "\n" for f in flows))
        return httpx.Response(200, json={"flows": list(flows), "count": len(flows), "connections": 0,
                                         "events_lost": {}, "buffer": {"size": 0, "capacity": 1}})
    return httpx.MockTransport(handler)


def test_not_negates_the_flag_that_follows():
    seen = []
    r = CliRunner().invoke(cli, ["observe", "--not", "--verdict", "forwarded", "--to-port", "5432",
                                 "--not", "--from-label=app=web", "--from-endpoint", "web1",
                                 "--to-identity", "257", "--until", "1m", "--first", "5"],
                           obj={"transport": _transport(seen)})
    assert r.exit_code == 0, r.output
    assert sorted(seen[0]) == sorted([("not_verdict", "FORWARDED"), ("to_port", "5432"),
                                      ("not_from_label", "app=web"), ("from_endpoint", "web1"),
                                      ("to_identity", "257"), ("until", "1m"), ("first", "5")])
    r = CliRunner().invoke(cli, ["observe", "--not", "--since", "5m"], obj={"transport": _transport([])})
    assert r.exit_code == 2 and "--not must be followed by a filter flag" in r.output
    r = CliRunner().invoke(cli, ["observe", "-f", "--until", "1m"], obj={"transport": _transport([])})
    assert r.exit_code == 2 and "cannot be used with --follow" in r.output


def test_observe_flags_are_the_flow_filter_table():
    """Every flow filter (stockade.flows.filters.KEYS) is an observe option and every
    filter option is one: the CLI builds its flags from the table, nothing is copied."""
    from stockade.cli.observe import observe
    from stockade.flows.filters import CRITERIA, KEYS
    options = {p.name for p in observe.params} - {"socket_path", "output", "colour", "follow",
                                                   "negate"}
    assert options == set(KEYS)
    flags = {p.name: p for p in observe.params}
    for c in CRITERIA:
        assert flags[c.key].opts == ["--" + c.key.replace("_", "-")] and flags[c.key].multiple
        assert flags["not_" + c.key].hidden


def _flows():
    r = FlowRing(100)
    Decoder(r, resolver()).decode_into_ring([
        raw_event(A4, B4, 0, ifindex=12),
        raw_event(X4, B4, 0, verdict=1, reason=2, src_id=WORLD, ifindex=12, match=m.MATCH_DENY),
        raw_event(B4, A4, 1, proto=1, sport=7, dport=7, icmp_type=8, src_id=DB, dst_id=WEB,
                  ifindex=12, flags=0, match=m.MATCH_NOT_ENFORCED)])
    return [r.to_dict(row) for row in r.rows()]


def test_jsonpb_has_hubbles_names_and_shapes():
    tcp, drop, icmp = (to_jsonpb(f) for f in _flows())
    assert set(tcp) == {"flow", "node_name", "time"} and tcp["node_name"] == "h1"
    f = tcp["flow"]
    assert f["time"] == tcp["time"] and f["verdict"] == "FORWARDED" and f["Type"] == "L3_L4"
    assert f["IP"] == {"source": A4, "destination": B4, "ipVersion": "IPv4"}
    assert f["l4"] == {"TCP": {"source_port": 40000, "destination_port": 5432, "flags": {"SYN": True}}}
    assert f["source"] == {"identity": WEB, "labels": ["k8s:app=web", "k8s:tier=front"], "pod_name": "web"}
    assert f["destination"]["pod_name"] == "db" and f["traffic_direction"] == "INGRESS"
    assert f["event_type"] == {"type": 4} and f["is_reply"] is False and f["Summary"] == "TCP Flags: SYN"
    assert f["ingress_allowed_by"] == [{"name": "default/db"}]
    assert "drop_reason_desc" not in f
    d = drop["flow"]
    assert (d["verdict"], d["drop_reason"], d["drop_reason_desc"], d["event_type"]) == (
        "DROPPED", 181, "POLICY_DENY", {"type": 1})
    assert "pod_name" not in d["source"] and d["source"]["labels"] == ["reserved:world"]
    i = icmp["flow"]
    assert i["l4"] == {"ICMPv4": {"type": 8}} and i["traffic_direction"] == "EGRESS"
    assert i["Summary"] == "ICMPv4 EchoRequest"


def test_compact_and_jsonpb_output():
    flows = _flows()
    r = CliRunner().invoke(cli, ["observe", "-o", "compact"], obj={"transport": _transport([], flows)})
    lines = r.output.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("web:40000 (ID:1001) -> db:5432 (ID:1002) to-endpoint FORWARDED (TCP Flags: SYN)")
    assert lines[1].endswith(f"{X4}:40000 (ID:2) -> db:5432 (ID:1002) to-endpoint DROPPED (TCP Flags: SYN) "
                             "POLICY_DENY")
    assert lines[0] == compact(flows[0])
    r = CliRunner().invoke(cli, ["observe", "-o", "jsonpb"], obj={"transport": _transport([], flows)})
    assert [json.loads(line) for line in r.output.splitlines()] == [to_jsonpb(f) for f in flows]


class _Source:
    """The real FlowSource's follow over a ring, without a datapath."""

    def __init__(self, ring):
        from stockade.daemon.flowsource import FlowSource
        self.stopping = threading.Event()
        self.fs = FlowSource.__new__(FlowSource)
        self.fs.ring = ring
        self.fs.agent = self


def test_follow_with_since_prints_history_then_new_flows():
    ring = FlowRing(100)
    d = Decoder(ring, resolver())
    d.decode_into_ring([raw_event(A4, B4, 0, ifindex=12, sport=1000 + i) for i in range(3)])
    src = _Source(ring)
    stream = src.fs.follow({"since": "10m"}, src.stopping)
    got = [next(stream)["l4"]["source_port"] for _ in range(3)]
    assert got == [1000, 1001, 1002]
    threading.Timer(0.2, lambda: d.decode_into_ring([raw_event(A4, B4, 0, ifindex=12, sport=2000)])).start()
    nxt = next(f for f in stream if f is not None)
    assert nxt["l4"]["source_port"] == 2000
    src.stopping.set()
    # without since or last only new flows come
    stream = src.fs.follow({}, None)
    src.stopping.clear()
    threading.Timer(0.2, lambda: d.decode_into_ring([raw_event(A4, B4, 0, ifindex=12, sport=3000)])).start()
    assert next(f for f in stream if f is not None)["l4"]["source_port"] == 3000
    src.stopping.set()
