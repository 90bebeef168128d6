"""Flow records without a kernel: decoding raw events, the ring, filters, the flow log."""
from __future__ import annotations

import ipaddress
import json
import time

import pytest

from stockade.datapath import maps as m
from stockade.errors import InvalidRequest
from stockade.flows import Decoder, FlowFilter, FlowLog, FlowRing, Resolver, parse_time
from stockade.flows.record import RECORD_SIZE

WEB, DB, WORLD = 1001, 1002, 2
POLICY_DB = 7  # the policy_id of the entry that allows db:5432 (events carry it)
A4, B4, X4 = "10.9.0.1", "10.9.0.2", "192.0.2.7"
A6, B6 = "fd00::1", "fd00::2"


def raw_event(src, dst, direction, verdict=0, reason=0, proto=6, sport=40000, dport=5432,
              src_id=WEB, dst_id=DB, ifindex=11, flags=0x02, icmp_type=0, match=m.MATCH_ALLOW,
              ts=None, policy_exact=None, policy_any=0) -> bytes:
    ev = m.FlowEvent(timestamp=ts if ts is not None else time.monotonic_ns(), ifindex=ifindex,
                     src_identity=src_id, dst_identity=dst_id, direction=direction,
                     verdict=verdict, reason=reason, proto=proto, sport=sport, dport=dport,
                     tcp_flags=flags, icmp_type=icmp_type, pkt_len=74, policy_match=match,
                     policy_exact=(POLICY_DB if dport == 5432 and match & 0x0F == m.MATCH_ALLOW
                                   else 0) if policy_exact is None else policy_exact,
                     policy_any=policy_any)
    sa, da = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    ev.ip_version = sa.version
    ev.saddr[:] = list(sa.packed.ljust(16, b"\0"))
    ev.daddr[:] = list(da.packed.ljust(16, b"\0"))
    return bytes(ev)


def pad(ip):
    return ipaddress.ip_address(ip).packed.ljust(16, b"\0")


def resolver():
    return Resolver(
        endpoints_by_ifindex={11: "web", 12: "db"},
        endpoints_by_addr={pad(A4): ("web", "h1"), pad(B4): ("db", "h1"),
                           pad(A6): ("web", "h1"), pad(B6): ("db", "h1")},
        labels={WEB: ("k8s:app=web", "k8s:tier=front"), DB: ("k8s:app=db",),
                WORLD: ("reserved:world",)},
        policies=lambda exact, any_peer, deny: ["default/db"] if POLICY_DB in (exact, any_peer) else [],
        ifnames={11: "vethweb", 12: "vethdb"}, host="h1")


@pytest.fixture
def ring():
    r = FlowRing(1000)
    d = Decoder(r, resolver())
    d.decode_into_ring([
        # web -> db :5432 allowed, seen at web's egress and db's ingress
        raw_event(A4, B4, 1, ifindex=11),
        raw_event(A4, B4, 0, ifindex=12),
        # web -> db :5433 denied at db's ingress
        raw_event(A4, B4, 0, verdict=1, reason=1, dport=5433, ifindex=12,
                  match=m.MATCH_DEFAULT_DENY),
        # world -> db :5432 denied by a deny rule (IPv4)
        raw_event(X4, B4, 0, verdict=1, reason=2, src_id=WORLD, ifindex=12, match=m.MATCH_DENY),
        # web -> db over IPv6, UDP 53, audit
        raw_event(A6, B6, 1, verdict=2, reason=1, proto=17, dport=53, flags=0, ifindex=11,
                  match=m.MATCH_DEFAULT_DENY),
        # db pings web: ICMP echo, forwarded, not enforced
        raw_event(B4, A4, 1, proto=1, sport=7, dport=7, icmp_type=8, src_id=DB, dst_id=WEB,
                  ifindex=12, flags=0, match=m.MATCH_NOT_ENFORCED),
    ])
    return r


def select(ring, **criteria):
    rows = FlowFilter.parse({k: v if isinstance(v, list) or k in ("since", "last") else [v]
                             for k, v in criteria.items()}).select(ring)
    return [ring.to_dict(r) for r in rows]


def test_record_shape(ring):
    f = select(ring)[0]
    assert f["verdict"] == "FORWARDED" and f["drop_reason"] is None
    assert f["direction"] == "egress" and f["ip_version"] == 4
    assert f["ip"] == {"source": A4, "destination": B4}
    assert f["l4"] == {"protocol": "tcp", "source_port": 40000, "destination_port": 5432,
                       "tcp_flags": ["SYN"]}
    assert f["source"] == {"identity": WEB, "labels": ["k8s:app=web", "k8s:tier=front"],
                           "endpoint": {"name": "web", "host": "h1"}}
    assert f["destination"]["endpoint"] == {"name": "db", "host": "h1"}
    assert f["policy"] == ["default/db"] and f["policy_match"] == "allow"
    assert f["interface"] == {"index": 11, "name": "vethweb"}
    assert f["time"].endswith("Z") and f["time"][10] == "T"
    assert abs(parse_time(f["time"]) - time.time_ns()) < 5e9


def test_drop_reasons_and_world(ring):
    drops = select(ring, verdict="DROPPED")
    assert [(d["drop_reason"], d["source"]["identity"]) for d in drops] == [
        ("policy_denied", WEB), ("policy_deny_rule", WORLD)]
    assert drops[1]["source"]["endpoint"] is None
    assert drops[1]["source"]["labels"] == ["reserved:world"]
    assert drops[0]["policy"] == []  # default deny: no policy entry decided


def test_icmp_and_ipv6(ring):
    icmp = select(ring, protocol="icmp")
    assert len(icmp) == 1 and icmp[0]["l4"]["icmp_type"] == 8
    assert icmp[0]["l4"]["source_port"] is None and icmp[0]["policy_match"] == "not-enforced"
    v6 = select(ring, ip="fd00::/64")
    assert len(v6) == 1 and v6[0]["verdict"] == "AUDIT" and v6[0]["drop_reason"] == "policy_denied"


@pytest.mark.parametrize("criteria,expected", [
    ({}, 6),
    ({"verdict": "FORWARDED"}, 3),
    ({"verdict": ["FORWARDED", "AUDIT"]}, 4),                 # same flag twice: OR
    ({"verdict": "DROPPED", "port": 5432}, 1),                 # different flags: AND
    ({"port": [5432, 5433]}, 4),
    ({"protocol": "udp"}, 1),
    ({"protocol": ["udp", "icmp"]}, 2),
    ({"direction": "ingress"}, 3),
    ({"from_label": "app=web"}, 4),
    ({"from_label": "k8s:app=web,tier=front"}, 4),
    ({"from_label": "app=web,tier=back"}, 0),
    ({"from_label": ["app=db", "reserved:world"]}, 2),
    ({"to_label": "app=db", "verdict": "DROPPED"}, 2),
    ({"label": "app"}, 6),
    ({"identity": WORLD}, 1),
    ({"from_identity": DB}, 1),
    ({"ip": X4}, 1),
    ({"from_ip": "10.9.0.0/24"}, 4),
    ({"to_ip": [A4, B6]}, 2),
    ({"to_endpoint": "db"}, 5),
    ({"drop_reason": "policy_deny_rule"}, 1),
    ({"last": 2}, 2),
    ({"verdict": "FORWARDED", "last": 1}, 1),
    ({"since": "1m"}, 6),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_filters_select_exactly(ring, criteria, expected):
    assert len(select(ring, **criteria)) == expected


def test_last_keeps_newest_and_since_future_is_empty(ring):
    assert select(ring, last=1)[0]["l4"]["protocol"] == "icmp"
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    assert select(ring, since=future) == []


@pytest.mark.parametrize("criteria,field", [
    ({"verdict": ["DENIED"]}, "verdict"),
    ({"port": ["http"]}, "port"),
    ({"ip": ["10.0.0.300"]}, "ip"),
    ({"protocol": ["gre"]}, "protocol"),
    ({"since": "yesterday"}, "since"),
    ({"last": "0"}, "last"),
    ({"bogus": ["1"]}, "bogus"),
    ({"from_label": ["=x"]}, "from_label"),
], ids=["verdict", "port", "ip", "protocol", "since", "last", "unknown", "label"])
def test_bad_criteria_name_the_field(criteria, field):
    with pytest.raises(InvalidRequest) as exc:
        FlowFilter.parse(criteria)
    assert exc.value.field == field


def test_both_hooks_one_connection(ring):
    web_db = select(ring, port=5432, verdict="FORWARDED")
    assert {f["direction"] for f in web_db} == {"egress", "ingress"}
    assert len({f["connection"] for f in web_db}) == 1


def test_ring_is_bounded_and_follow_sees_only_new():
    ring = FlowRing(100)
    d = Decoder(ring, resolver())
    batch = [raw_event(A4, B4, 1, sport=i) for i in range(250)]
    d.decode_into_ring(batch)
    assert len(ring) == 100 and ring.seq == 250 and ring.nbytes == 100 * RECORD_SIZE
    assert [r[10] for r in ring.rows()] == list(range(150, 250))   # oldest first
    rows, seq, skipped = ring.rows_since(0)
    assert (len(rows), seq, skipped) == (100, 250, 150)
    d.decode_into_ring([raw_event(A4, B4, 1, sport=999)])
    rows, seq, skipped = ring.rows_since(250)
    assert ([r[10] for r in rows], seq, skipped) == ([999], 251, 0)
    assert d.verdicts[(0, 1, 0)] == 251


def test_flow_log_writes_every_flow_in_order_in_chunks(tmp_path):
    log = FlowLog(str(tmp_path / "flows.log"), max_bytes=0)
    flows = [{"n": i, "pad": "x" * (i % 300)} for i in range(3000)]   # chunks of 64 KiB
    try:
        log.write(iter(flows))
        log.write([])
        log.write([{"n": "last"}])
    finally:
        log.close()
    lines = (tmp_path / "flows.log").read_text().splitlines()
    assert [json.loads(x) for x in lines] == flows + [{"n": "last"}]


def test_rendered_addresses_are_cached_within_bounds():
    from stockade.flows import record
    assert record.address.cache_info().maxsize == record.ADDRESS_CACHE_MAX
    for i in range(record.ADDRESS_CACHE_MAX // 2 + 40):
        assert record.address(pad(f"10.2.{i >> 8}.{i & 255}"), 4) == f"10.2.{i >> 8}.{i & 255}"
        assert record.address(pad(f"fd00::{i + 1:x}"), 6) == f"fd00::{i + 1:x}"
    assert record.address.cache_info().currsize == record.ADDRESS_CACHE_MAX
    assert record.address(pad("10.2.0.1"), 6) == "a02:1::"       # the version decides


def test_flow_log_rotates(tmp_path, ring):
    log = FlowLog(str(tmp_path / "flows.log"), max_bytes=2000, backups=2)
    try:
        for _ in range(10):
            log.write(ring.to_dict(r) for r in ring.rows())
    finally:
        log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["flows.log", "flows.log.1", "flows.log.2"]
    for name in files:
        for line in (tmp_path / name).read_text().splitlines():
            assert json.loads(line)["verdict"] in ("FORWARDED", "DROPPED", "AUDIT")
        assert (tmp_path / name).stat().st_size <= 2000 + 1000
