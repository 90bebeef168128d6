"""L7 flows: the proxy's request log lines -> records -> flows with Hubble's l7 shape,
their filters, and ``policy trace`` with an HTTP request. Real traffic through the proxy
is in tests/root/test_l7_http.py."""
import contextlib
import json
import os
import time

import pytest

from inprocess_agent import inprocess_agent
from stockade.daemon.flowsource import FlowSource
from stockade.errors import InvalidRequest
from stockade.flows import FlowFilter, FlowRing, hubble
from stockade.flows.l7 import L7Info, L7Table
from stockade.l7 import logs
from stockade.l7.logs import MAX_TEXT, LogReader, _text, canonical_address, parse_line
from stockade.l7.proxy import L7Proxy
from stockade.l7.rules import http_request
from stockade.policy.sel import parse_sel
from stockade.policy.trace import Tracer
from test_compiler import policy

NOW_US = 1796230221449974


def line(**kw) -> bytes:
    f = {"ci": "10.0.0.1", "cp": "40000", "fi": "10.0.0.2", "fp": "8080", "sid": "256",
         "did": "257", "rs": "1", "ok": "1", "m": "GET", "url": "\\/api\\/x?q=\\\"1\\\"",
         "hv": "HTTP/1.1", "st": "200", "tq": "1", "tr": "2", "ta": "3", "host": "api",
         "ua": "curl\\t7", "tsc": "----", "date": str(NOW_US), "ts": str(NOW_US // 10**6),
         "ms": "445", "rse": "-", "oke": "-"}
    f.update(kw)
    return ("stockade-l7\t" + "\t".join(f.values()) + "\n").encode()


def test_parse_line_decodes_escaped_fields():
    r = parse_line(line())
    assert (r.client, r.client_port, r.server, r.server_port) == ("10.0.0.1", 40000, "10.0.0.2", 8080)
    assert (r.src_identity, r.dst_identity, r.allowed, r.verdict) == (256, 257, True, "FORWARDED")
    assert r.rule_set == 1
    assert (r.method, r.path, r.host, r.user_agent) == ("GET", '/api/x?q="1"', "api", "curl\t7")
    assert r.status == 200 and r.log_ns == NOW_US * 1000
    assert r.request_ns == (NOW_US // 10**6 * 1000 + 445 + 1) * 10**6
    assert r.latency_ns == NOW_US * 1000 - r.request_ns
    denied = parse_line(line(ok="0", st="403", tr="-1"))
    assert denied.allowed is False and denied.verdict == "DROPPED"
    bad = parse_line(line(sid="-", did="-", rs="-", ok="-", m="<BADREQ>", hv="<BADREQ>",
                          url="-", host="-", ua="-", st="400"))
    assert bad.allowed is None and bad.method == "" and bad.src_identity is None and bad.path == ""
    assert bad.rule_set is None


@pytest.mark.parametrize("data", [
    b"", b"\xff\xfe", b"stockade-l7\t" * 30, line()[:-20], line().replace(b"stockade-l7", b"other"),
    line(ci="not-an-ip"), line(cp="70000"), line(sid="-5"), line(rs="x"), line(rs="-1"), line(ok="yes"), line(st="1000"),
    line(url='bad"quote'), line(url="\\u12"), line(m="G\x01T"), line(m="A" * 100),
    line(url="\\ud800x"), line(date="x"), line(sid="99999999999999999999"),
])
def test_parse_line_refuses_garbage(data):
    with pytest.raises((ValueError, KeyError, UnicodeDecodeError, OverflowError)):
        parse_line(data)


@pytest.mark.parametrize("value", [
    "\\/api\\/x", "\\\\/x", "\\\\\\/", "a\\/\\\\", "\\u0041\\/", "\\/\\n", "plain ~!@#$%^&*()", "\\/", "x\\",
    "\x7f", "caf\u00e9\\/", "\\ud83d\\ude00", "a" * (MAX_TEXT + 5) + "\\/", "\\/" * (MAX_TEXT + 5), "",
])
def test_text_reads_escapes_as_json_does(value):
    """The fast path for lines with nothing escaped but "/" gives what json.loads does."""
    try:
        want = json.loads(f'"{value}"')[:MAX_TEXT]
    except ValueError:
        with pytest.raises(ValueError):
            _text(value)
    else:
        assert _text(value) == want


def test_address_cache_is_bounded():
    assert canonical_address.cache_info().maxsize == logs.ADDR_CACHE_MAX
    for i in range(logs.ADDR_CACHE_MAX + 50):
        assert canonical_address(f"10.1.{i >> 8}.{i & 255}") == f"10.1.{i >> 8}.{i & 255}"
    assert canonical_address.cache_info().currsize == logs.ADDR_CACHE_MAX
    assert canonical_address("2001:DB8:0:0::1") == "2001:db8::1"
    canonical_address.cache_clear()
    for _ in range(2):
        with pytest.raises(ValueError):
            canonical_address("010.0.0.1")
    assert canonical_address.cache_info().currsize == 0      # a refused value is not kept


def _read_all(reader, got, n):
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_log_reader_counts_garbage_and_keeps_reading():
    got = []
    reader = LogReader(got.extend)
    wfd = reader.ensure()
    assert reader.ensure() == wfd and reader.size >= 1 << 16
    try:
        # lines split anywhere across writes; a too long one (dropped to its end); a line
        # cut short (a partial write) running into the next, which is still read
        stream = (b"junk\n" + line() + b"\x00" * 20000 + b"\n" + line(st="403", ok="0")
                  + line()[:40] + line(st="404"))
        for k in range(0, len(stream), 7000):
            os.write(wfd, stream[k:k + 7000])
            time.sleep(0.01)
        _read_all(reader, got, 3)
        assert [r.status for r in got] == [200, 403, 404]
        assert reader.stats() == {"received": 6, "garbled": 3, "dropped": 0, "sink_errors": 0,
                                  "pipe_bytes": reader.size}
        assert dict(reader.requests) == {("FORWARDED", 200): 1, ("DROPPED", 403): 1,
                                         ("FORWARDED", 404): 1}
    finally:
        reader.stop()
    with pytest.raises(OSError):
        os.fstat(wfd)


def test_log_reader_reads_a_burst_whole():
    """20,000 lines written faster than they are read: all of them, none lost."""
    got = []
    reader = LogReader(got.extend)
    wfd = reader.ensure()
    try:
        one = line()
        for _ in range(200):
            os.write(wfd, one * 100)
        _read_all(reader, got, 20000)
        assert len(got) == 20000 and reader.garbled == 0
    finally:
        reader.stop()


def test_l7_table_never_returns_another_rows_part():
    t = L7Table(2)
    info = L7Info("REQUEST", 0, "GET", "/", "h", "HTTP/1.1", 0, ())
    a = t.add(info)
    b = t.add(info._replace(path="/b"))
    c = t.add(info._replace(path="/c"))        # overwrites a's slot
    assert t.get(a) is None and t.get(b).path == "/b" and t.get(c).path == "/c"
    assert t.get(0) is None


API_L7 = ("{endpointSelector: {matchLabels: {app: api}}, ingress: [{fromEndpoints: "
          "[{matchLabels: {app: web}}], toPorts: [{ports: [{port: '8080', protocol: TCP}], "
          "rules: {http: [{method: GET, path: '/api/.*'}, {method: POST, path: /submit, "
          "headers: ['X-Token: s3cret']}, {path: /h, host: 'api\\.example'}]}}]}, "
          "{fromEndpoints: [{matchLabels: {app: ops}}], toPorts: [{ports: [{port: '8080', "
          "protocol: TCP}]}]}]}")


@pytest.fixture
def source(tmp_path):
    api = inprocess_agent(str(tmp_path / "state"), l7_run_dir=str(tmp_path / "l7"))
    for name, ip, app in (("web1", "10.0.0.1", "web"), ("api1", "10.0.0.2", "api")):
        api.add_endpoint({"name": name, "interface": f"v{name}", "ips": [ip], "labels": {"app": app}})
    api.put_policies([{"name": "api.yaml", "text": "apiVersion: cilium.io/v2\nkind: "
                       "CiliumNetworkPolicy\nmetadata: {name: api}\nspec: " + API_L7}])
    api.agent.dp.policy_names = lambda *ids: ()   # the recording datapath has no table
    fs = FlowSource(api.agent)
    fs.refresh(force=True)
    yield api, fs
    api.agent.stop()


def rule_sets(api) -> dict[str, str]:
    """The proxy's rulesets map as the agent's L7 manager builds it now (its numbering
    only: no process, no host steering)."""
    with api.agent.locked():
        return api.agent_l7.desired()[2]["rulesets"]


@contextlib.contextmanager
def proxy_logging(api):
    """The L7 manager attached while its log lines are read (never across a commit:
    that would install host steering)."""
    api.agent.l7 = api.agent_l7
    try:
        yield
    finally:
        api.agent.l7 = None


@pytest.fixture
def numbered(source):
    api, fs = source
    api.agent_l7 = L7Proxy(api.agent)
    return api, fs


def test_records_become_request_and_response_flows(numbered):
    api, fs = numbered
    eps = {e["name"]: e for e in api.list_endpoints()}
    web, srv = eps["web1"]["identity"], eps["api1"]["identity"]
    rs = rule_sets(api)[f"{srv}:8080:{web}"]
    recs = [parse_line(line(sid=str(web), did=str(srv), rs=rs)),
            parse_line(line(sid=str(web), did=str(srv), rs=rs, m="DELETE", ok="0", st="403",
                            tr="-1"))]
    with proxy_logging(api):
        assert fs.add_l7(recs) == 4
    flows = fs.query({})["flows"]
    req, resp = flows[0], flows[1]
    assert req["l7"] == {"type": "REQUEST", "latency_ns": 0, "http": {
        "method": "GET", "url": 'http://api/api/x?q="1"', "protocol": "HTTP/1.1", "code": 0,
        "headers": [{"key": "host", "value": "api"}, {"key": "user-agent", "value": "curl\t7"}]}}
    assert resp["l7"]["type"] == "RESPONSE" and resp["l7"]["http"]["code"] == 200
    assert resp["l7"]["latency_ns"] > 0 and resp["is_reply"] and not req["is_reply"]
    assert req["source"]["endpoint"]["name"] == "web1" and req["source"]["identity"] == web
    assert resp["source"]["endpoint"]["name"] == "api1"
    assert "static:app=web" in req["source"]["labels"]
    assert req["verdict"] == "FORWARDED" and req["policy"] == ["api"]
    assert req["connection"] == "tcp 10.0.0.1:40000 -> 10.0.0.2:8080"
    assert [f["verdict"] for f in flows[2:]] == ["DROPPED", "DROPPED"]
    assert flows[2]["drop_reason"] == "policy_denied"

    def sel(**criteria):
        return [(f["l7"]["type"], f["l7"]["http"]["method"])
                for f in fs.query({k: v if isinstance(v, list) else [v]
                                   for k, v in criteria.items()})["flows"]]
    assert sel(type="l7") == sel() and sel(type="trace") == [] and sel(type="drop") == []
    assert sel(http_status="4+") == [("RESPONSE", "DELETE")]
    assert sel(http_status="200") == [("RESPONSE", "GET")]
    assert sel(http_method="delete") == [("REQUEST", "DELETE"), ("RESPONSE", "DELETE")]
    assert len(sel(http_path="^/api/x")) == 4 and sel(http_path="nope") == []
    assert len(sel(http_host="API")) == 4 and sel(http_host="other") == []
    assert sel(not_http_method="GET", verdict="DROPPED") == [("REQUEST", "DELETE"), ("RESPONSE", "DELETE")]
    # Hubble's shapes
    pb = hubble.to_flow(resp)
    assert pb["Type"] == "L7" and pb["event_type"] == {"type": 129}
    assert pb["l7"]["type"] == "RESPONSE" and pb["l7"]["http"]["code"] == 200
    assert pb["l7"]["latency_ns"] == str(resp["l7"]["latency_ns"])
    assert pb["Summary"].startswith('HTTP/1.1 200 ')
    assert "http-response FORWARDED (HTTP/1.1 200" in hubble.compact(resp)
    json.dumps(pb)


def test_l7_flows_name_the_policy_that_decided_them_at_the_time(numbered):
    """The rule set number the proxy logs names the policies behind it when it applied
    them: after the policy changes, a request decided before still names the old one."""
    api, fs = numbered
    eps = {e["name"]: e for e in api.list_endpoints()}
    web, srv = eps["web1"]["identity"], eps["api1"]["identity"]
    before = rule_sets(api)
    assert rule_sets(api) == before                 # numbers are stable while nothing changes
    old = before[f"{srv}:8080:{web}"]
    api.put_policies([{"name": "api2.yaml", "text": "apiVersion: cilium.io/v2\nkind: "
                       "CiliumNetworkPolicy\nmetadata: {name: api-v2}\nspec: " + API_L7}],
                     replace_all=True)
    new = rule_sets(api)[f"{srv}:8080:{web}"]
    assert new != old
    with proxy_logging(api):
        fs.add_l7([parse_line(line(sid=str(web), did=str(srv), rs=old)),
                   parse_line(line(sid=str(web), did=str(srv), rs=new)),
                   parse_line(line(sid=str(web), did=str(srv), rs="-", ok="0", st="403"))])
    requests = [f for f in fs.query({})["flows"] if f["l7"]["type"] == "REQUEST"]
    assert [f["policy"] for f in requests] == [["api"], ["api-v2"], []]
    assert api.agent_l7.rule_sets.policies(int(old)) == ("api",)


WEB_EGRESS = ("{endpointSelector: {matchLabels: {app: web}}, egress: [{toEndpoints: "
              "[{matchLabels: {app: api}}], toPorts: [{ports: [{port: '8080', protocol: TCP}], "
              "rules: {http: [{method: GET, path: '/api/x.*'}]}}]}]}")


def test_egress_rule_sets_and_flows_per_direction(numbered):
    """The client's egress rule set is keyed e:<client>:<port>:<server>; a request both
    directions judged gives rows as Cilium's two passes: egress, then ingress only when
    egress let it through."""
    api, fs = numbered
    api.put_policies([{"name": "web.yaml", "text": "apiVersion: cilium.io/v2\nkind: "
                       "CiliumNetworkPolicy\nmetadata: {name: web}\nspec: " + WEB_EGRESS}])
    eps = {e["name"]: e for e in api.list_endpoints()}
    web, srv = eps["web1"]["identity"], eps["api1"]["identity"]
    rsets = rule_sets(api)
    rs_in, rs_eg = rsets[f"{srv}:8080:{web}"], rsets[f"e:{web}:8080:{srv}"]
    with api.agent.locked():
        ports = api.agent_l7.desired()[0]
    assert ports == {("10.0.0.2", 8080, 0): srv, ("10.0.0.1", 8080, 1): web}
    ids = dict(sid=str(web), did=str(srv), rs=rs_in, rse=rs_eg)
    with proxy_logging(api):
        fs.add_l7([parse_line(line(**ids, url="\\/api\\/x1", oke="1")),             # both pass
                   parse_line(line(**ids, url="\\/api\\/x2", oke="1", ok="0", st="403")),
                   parse_line(line(**ids, url="\\/no", oke="0", ok="0", st="403")),
                   parse_line(line(sid=str(web), did=str(srv), rs="-", rse=rs_eg, oke="1",
                                   url="\\/api\\/x3"))])                            # egress only
    got = [(f["l7"]["http"]["url"].split("api", 1)[1], f["direction"], f["verdict"], f["policy"])
           for f in fs.query({})["flows"] if f["l7"]["type"] == "REQUEST"]
    assert got == [("/api/x1", "egress", "FORWARDED", ["web"]),
                   ("/api/x1", "ingress", "FORWARDED", ["api"]),
                   ("/api/x2", "egress", "FORWARDED", ["web"]),
                   ("/api/x2", "ingress", "DROPPED", ["api"]),
                   ("/no", "egress", "DROPPED", ["web"]),
                   ("/api/x3", "egress", "FORWARDED", ["web"])]


def test_trace_by_egress_http_rules_and_both_sides():
    t = Tracer([policy(API_L7), policy(WEB_EGRESS, name="web")])

    def tr(path, method="GET"):
        return t.trace(parse_sel("app=web"), parse_sel("app=api"), 6, 8080,
                       http_request(method=method, path=path))
    ok = tr("/api/x1")
    assert ok["verdict"] == "allow" and ok["egress"]["http"]["matched"] == {
        "method": "GET", "path": "/api/x.*"}
    assert ok["ingress"]["http"]["matched"] == {"method": "GET", "path": "/api/.*"}
    eg = tr("/api/y")                                  # ingress passes, egress does not
    assert eg["verdict"] == "deny" and "403" in eg["egress"]["reason"]
    assert eg["ingress"]["verdict"] == "allow"
    only_eg = Tracer([policy(WEB_EGRESS, name="web")])
    r = only_eg.trace(parse_sel("app=web"), parse_sel("app=api"), 6, 8080,
                      http_request(method="POST", path="/api/x"))
    assert r["verdict"] == "deny" and r["egress"]["http"]["enforced"]
    plain = only_eg.trace(parse_sel("app=web"), parse_sel("app=api"), 6, 8080)
    assert plain["verdict"] == "allow" and "give a request" in plain["egress"]["reason"]


def test_bad_request_flows_use_the_ipcache_identity(source):
    api, fs = source
    web = {e["name"]: e for e in api.list_endpoints()}["web1"]["identity"]
    fs.add_l7([parse_line(line(sid="-", did="-", rs="-", ok="-", m="<BADREQ>", hv="<BADREQ>",
                               url="-", host="-", ua="-", st="400"))])
    req = fs.query({})["flows"][0]
    assert req["verdict"] == "DROPPED" and req["drop_reason"] == "invalid"
    assert req["source"]["identity"] == web and req["l7"]["http"]["method"] == ""


def test_l7_peer_cache_is_bounded_and_follows_the_snapshot(source):
    """The flow source keeps each side of an L7 row per (address, identity logged), at
    most L7_PEER_CACHE_MAX, and only as long as the agent's snapshot it came from."""
    from stockade.daemon import flowsource
    api, fs = source
    web = {e["name"]: e for e in api.list_endpoints()}["web1"]["identity"]
    assert fs._l7_peer.cache_info().maxsize == flowsource.L7_PEER_CACHE_MAX
    bad = dict(sid="-", did="-", rs="-", ok="-", m="<BADREQ>", hv="<BADREQ>", url="-", host="-",
               ua="-", st="400")
    n = flowsource.L7_PEER_CACHE_MAX + 20
    fs.add_l7([parse_line(line(ci=f"10.9.{i >> 8}.{i & 255}", **bad)) for i in range(n)])
    assert fs._l7_peer.cache_info().currsize == flowsource.L7_PEER_CACHE_MAX
    assert {f["source"]["identity"] for f in fs.query({"last": 40})["flows"]
            if not f["is_reply"]} == {2}
    fs.add_l7([parse_line(line(**bad))])
    assert fs.query({})["flows"][-2]["source"]["identity"] == web
    assert fs.query({})["flows"][-2]["source"]["endpoint"]["name"] == "web1"
    api.remove_endpoint("web1")
    fs.refresh(force=True)
    fs.add_l7([parse_line(line(**bad))])          # the same address: no longer web1's
    req = fs.query({})["flows"][-2]
    assert req["source"]["endpoint"] is None and req["source"]["identity"] != web


@pytest.mark.parametrize("criteria, field", [
    ({"type": ["l8"]}, "type"), ({"http_status": ["2xx"]}, "http_status"),
    ({"http_status": ["600"]}, "http_status"), ({"http_path": ["("]}, "http_path"),
    ({"http_path": ["a" * 2000]}, "http_path"),
])
def test_bad_l7_filters_refused(criteria, field):
    with pytest.raises(InvalidRequest) as info:
        FlowFilter.parse(criteria)
    assert field in str(info.value)


def test_plain_flows_have_no_l7_part():
    ring = FlowRing(4)
    row = (1, 0, 1, 2, 0, 0, 0, 60, b"\0" * 16, b"\0" * 16, 1, 2, 0, 0, 0, 4, 6, 2, 0, 0, 0, 0, 0)
    ring.append_rows([row])
    assert "l7" not in ring.to_dict(ring.rows()[0])
    assert FlowFilter.parse({"type": ["trace"]}).select(ring) and \
        not FlowFilter.parse({"http_method": ["GET"]}).select(ring)


# trace ----------------------------------------------------------------------------------

def _trace(src="app=web", **http):
    t = Tracer([policy(API_L7)])
    return t.trace(parse_sel(src), parse_sel("app=api"), 6, 8080, http_request(**http))


def test_trace_by_http_rules():
    assert _trace(method="GET", path="/api/x")["verdict"] == "allow"
    ok = _trace(method="GET", path="/api/x")["ingress"]["http"]
    assert ok["matched"] == {"method": "GET", "path": "/api/.*"} and len(ok["rules"]) == 3
    no = _trace(method="DELETE", path="/api/x")
    assert no["verdict"] == "deny" and "403" in no["ingress"]["reason"]
    assert no["ingress"]["http"]["matched"] is None
    assert _trace(method="GET", path="/api")["verdict"] == "deny"            # whole path
    assert _trace(method="POST", path="/submit")["verdict"] == "deny"         # header missing
    assert _trace(method="POST", path="/submit", headers=["x-token: s3cret"])["verdict"] == "allow"
    assert _trace(method="POST", path="/submit", headers=["X-Token: no"])["verdict"] == "deny"
    assert _trace(method="PUT", path="/h", host="api.example")["verdict"] == "allow"
    assert _trace(method="PUT", path="/h", host="evil")["verdict"] == "deny"


def test_trace_without_request_lists_rules_and_l4_peer_passes():
    plain = _trace()
    assert plain["verdict"] == "allow" and plain["ingress"]["http"]["enforced"]
    assert "give a request" in plain["ingress"]["reason"]
    ops = _trace(src="app=ops", method="DELETE", path="/anything")
    assert ops["verdict"] == "allow" and ops["ingress"]["http"]["matched"] == {}


def test_trace_http_on_a_port_without_rules():
    t = Tracer([policy(API_L7)])
    r = t.trace(parse_sel("app=web"), parse_sel("app=api"), 6, 9090,
                http_request(method="GET"))
    assert r["verdict"] == "deny"   # L4 denies first; no http part
    assert "http" not in r["ingress"]


def test_http_request_refuses_a_header_without_name():
    with pytest.raises(ValueError):
        http_request(headers=[": x"])
    assert http_request() is None


# policy test files with HTTP requests --------------------------------------------------

def _cases(items):
    from stockade.policy.testing import parse_cases, run_cases
    return run_cases(parse_cases(items, "t.yaml"), [policy(API_L7)])


def test_policy_test_cases_check_http_requests_as_trace_does():
    case = {"from": "app=web", "to": "app=api", "port": "8080/tcp"}
    results = _cases([
        {**case, "expect": "allow", "http": {"method": "GET", "path": "/api/x"}},
        {**case, "expect": "deny", "http": {"method": "DELETE", "path": "/api/x"}},
        {**case, "expect": "allow", "http": {"method": "POST", "path": "/submit",
                                             "headers": ["X-Token: s3cret"]}},
        {**case, "expect": "deny", "http": {"method": "POST", "path": "/submit",
                                            "headers": ["X-Token"]}},
        {**case, "expect": "allow", "http": {"method": "PUT", "path": "/h", "host": "api.example"}},
        {**case, "expect": "deny", "http": {}},                          # GET / matches no rule
        {**case, "expect": "allow"},                                     # no request: L4 only
        {**case, "from": "app=ops", "expect": "allow", "http": {"method": "DELETE"}},
        {**case, "expect": "allow", "http": {"method": "GET"}},          # a wrong expectation
    ])
    assert [r["passed"] for r in results] == [True] * 8 + [False]
    for r in results:
        req = r.get("http")
        want = _trace(r["from"], **req) if req else _trace(r["from"])
        # the same engine and answer as policy trace (identities aside: another Tracer)
        assert (r["trace"]["verdict"], r["trace"]["ingress"]) == (want["verdict"], want["ingress"])
    assert results[2]["http"] == {"method": "POST", "path": "/submit", "host": "",
                                  "headers": ["X-Token: s3cret"]}
    assert "403" in results[1]["trace"]["ingress"]["reason"] and "http" not in results[6]


@pytest.mark.parametrize("http, where, msg", [
    ("GET /", "[0].http", "must be a mapping"),
    ({"verb": "GET"}, "[0].http.verb", "unknown field"),
    ({"method": 7}, "[0].http.method", "must be a string"),
    ({"method": "GE T"}, "[0].http.method", "HTTP method token"),
    ({"method": "G" * 65}, "[0].http.method", "longer than 64"),
    ({"path": "/a b"}, "[0].http.path", "without spaces"),
    ({"path": "/\x1b[2J"}, "[0].http.path", "control characters"),
    ({"path": "/" * 9000}, "[0].http.path", "longer than 8192"),
    ({"path": "/\ud800"}, "[0].http.path", "control characters"),
    ({"host": ["a"]}, "[0].http.host", "must be a string"),
    ({"host": "a\r\nX: y"}, "[0].http.host", "without spaces"),
    ({"headers": "X-Token: s3cret"}, "[0].http.headers", "must be a list"),
    ({"headers": ["X"] * 101}, "[0].http.headers", "at most 100"),
    ({"headers": ["ok", {"X-Token": "s3cret"}]}, "[0].http.headers[1]", "quote it in YAML"),
    ({"headers": [": v"]}, "[0].http.headers[0]", "header name must be a token"),
    ({"headers": [None]}, "[0].http.headers[0]", "must be a string"),
    ({"headers": ["X-A: \x00"]}, "[0].http.headers[0]", "control characters"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("[") else None)
def test_policy_test_http_refuses_hostile_input_by_field_path(http, where, msg):
    from stockade.errors import PolicyErrors
    from stockade.policy.testing import parse_cases
    with pytest.raises(PolicyErrors) as info:
        parse_cases([{"from": "app=web", "to": "app=api", "port": "8080/tcp", "expect": "allow",
                      "http": http}], "t.yaml")
    assert f"t.yaml: {where}: " in str(info.value) and msg in str(info.value), str(info.value)


def test_policy_test_http_needs_a_tcp_port_and_reports_every_case():
    from stockade.errors import PolicyErrors
    from stockade.policy.testing import parse_cases
    with pytest.raises(PolicyErrors) as info:
        parse_cases([{"from": "app=web", "to": "app=api", "port": "53/udp", "expect": "allow",
                      "http": {"method": "GET"}},
                     {"from": "app=web", "to": "app=api", "port": "80/tcp", "expect": "allow",
                      "http": {"method": ""}}], "t.yaml")
    assert [e.path for e in info.value.errors] == ["[0].http", "[1].http.method"]
    assert "needs a TCP port, not 53/udp" in str(info.value)


def test_human_output_escapes_what_clients_sent(source):
    from stockade.cli.observe import format_line
    _api, fs = source
    fs.add_l7([parse_line(line(url="\\/x\\u001b[2J\\u0007"))])
    for f in fs.query({})["flows"]:
        assert f["l7"]["http"]["url"] == "http://api/x\x1b[2J\x07"    # the data, as sent
        for text in (format_line(f, False), hubble.compact(f), hubble.to_flow(f)["Summary"]):
            assert "\x1b" not in text and "\x07" not in text and "\\x1b[2J" in text


def test_a_refused_request_leaves_its_connection_forwarded():
    from stockade.flows import connections
    syn = {"connection": "tcp a:1 -> b:2", "verdict": "FORWARDED", "is_reply": False}
    req = {**syn, "verdict": "DROPPED", "l7": {"type": "REQUEST"}}
    assert connections([syn, req]) == [syn] and connections([req, syn]) == [syn]
    assert connections([req]) == [req]


def test_rule_descriptions_show_http_rules():
    from stockade.policy.describe import policy_lines
    lines = policy_lines([policy(API_L7)])
    assert any("8080/TCP (HTTP: GET /api/.*; POST /submit header X-Token: s3cret; "
               "/h host api\\.example)" in line for line in lines), lines


class _Running:
    def poll(self):
        return None


class _Info:
    def __init__(self):
        self.dropped = 0

    def command(self, line):
        assert line == "show info"
        return f"Name: HAProxy\nDroppedLogs: {self.dropped}\nUptime: 1\n"


def test_lines_the_proxy_dropped_are_counted_across_restarts(numbered):
    """HAProxy drops a log line that finds the pipe full and counts it (DroppedLogs):
    the agent's count is the sum over every proxy it ran."""
    api, _ = numbered
    p = api.agent_l7
    p.api, p.proc = _Info(), _Running()
    p.api.dropped = 7
    p.read_dropped()
    assert p.log_reader.stats()["dropped"] == 7
    p.read_dropped(every=60)            # not again so soon
    p.api.dropped = 9
    p.read_dropped(every=60)
    assert p.log_reader.dropped == 7
    p.read_dropped()
    assert p.log_reader.dropped == 9
    # a restart: the new proxy counts from 0 (what Popen starts is not run here)
    p._next_proxy_counts()
    p.proc = _Running()
    p.api.dropped = 3
    p.read_dropped()
    assert p.log_reader.dropped == 12
    p.proc = None


def test_a_field_ending_with_the_tag_is_not_a_line_start():
    got = []
    reader = LogReader(got.extend)
    batch: list = []
    whole = line(url="\\/x\\/stockade-l7", ua="stockade-l7")
    reader._add(batch, whole)
    reader._add(batch, whole[:60] + whole)          # cut short, then the next line
    assert [r.path for r in batch] == ["/x/stockade-l7"] * 2
    assert reader.stats()["received"] == 3 and reader.garbled == 1
