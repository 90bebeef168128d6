"""The API server over a real unix socket, with the fake agent behind it."""
from __future__ import annotations

import json
import os
import socket
import tempfile

import httpx
import pytest
import yaml

from fake_agent import FakeAgent
from stockade.daemon import server as srv
from stockade.daemon.routes import Access
from stockade.daemon.server import APIServer, Limits, Response, Route, status_for
from stockade.datapath.errors import CapacityError, DatapathError
from stockade.errors import (
    Conflict,
    HTTPError,
    IdentityError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PolicyError,
    PolicyErrors,
    SelectorError,
    StockadeError,
)

OPENAPI = os.path.join(os.path.dirname(__file__), "..", "docs", "api", "openapi.yaml")

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: lb}}]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
EP = {"name": "web1", "interface": "veth-web1", "ips": ["10.0.0.5"], "labels": {"app": "web"}}


@pytest.fixture
def agent():
    return FakeAgent()


@pytest.fixture
def server(agent, tmp_path):
    with APIServer(agent, str(tmp_path / "agent.sock")) as s:
        yield s


@pytest.fixture
def http(server):
    with httpx.Client(transport=httpx.HTTPTransport(uds=server.socket_path),
                      base_url="http://stockade") as c:
        yield c


def assert_error(resp, status, field=None, contains=""):
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and contains in err["message"]
    assert err["field"] == field
    return err


# ---------------------------------------------------------------- successes

@pytest.mark.parametrize("path", ["/v1/health", "/v1/endpoints", "/v1/identities",
                                  "/v1/ipcache", "/v1/policies", "/v1/services", "/v1/flows",
                                  "/v1/matrix", "/v1/trace?src=app=a&dst=app=b&dport=80/tcp"])
def test_get_routes_answer_json(http, path):
    r = http.get(path)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert isinstance(r.json(), (dict, list))


def test_endpoint_add_list_remove(http, agent):
    r = http.post("/v1/endpoints", json=EP)
    assert r.status_code == 201 and r.json()["name"] == "web1"
    assert http.post("/v1/endpoints", json=EP).status_code == 201, "same spec again is fine"
    assert [e["name"] for e in http.get("/v1/endpoints").json()] == ["web1"]
    assert http.delete("/v1/endpoints/web1").status_code == 204
    assert_error(http.delete("/v1/endpoints/web1"), 404, "name", "web1")
    assert ("add_endpoint", EP) in agent.calls


def test_endpoint_conflict_is_409(http):
    http.post("/v1/endpoints", json=EP)
    assert_error(http.post("/v1/endpoints", json={**EP, "name": "other"}), 409, "interface")


def test_ipcache_prefix_is_percent_decoded(http, agent):
    r = http.post("/v1/ipcache", json={"prefix": "10.1.0.0/16", "labels": {"app": "db"},
                                       "host": "h2"})
    assert r.status_code == 201 and r.json()["prefix"] == "10.1.0.0/16"
    assert http.get("/v1/ipcache").json()[0]["host"] == "h2"
    assert http.delete("/v1/ipcache/10.1.0.0%2F16").status_code == 204
    assert ("remove_ipcache", "10.1.0.0/16") in agent.calls


def test_policies_put_dry_run_then_apply_then_delete(http, agent):
    files = {"files": [{"name": "web.yaml", "text": POLICY}]}
    r = http.put("/v1/policies", params={"dry_run": "true"}, json=files)
    assert r.status_code == 200 and r.json()["dry_run"] and r.json()["diff"]["added"] == ["shop/web"]
    assert http.get("/v1/policies").json() == []
    r = http.put("/v1/policies", params={"replace_all": "false"}, json=files)
    assert r.json()["changed"] and not r.json()["dry_run"]
    assert [p["name"] for p in http.get("/v1/policies").json()] == ["web"]
    r = http.delete("/v1/policies/web", params={"namespace": "shop", "dry_run": "true"})
    assert r.json()["diff"]["removed"] == ["shop/web"] and len(http.get("/v1/policies").json()) == 1
    r = http.delete("/v1/policies")
    assert r.json()["diff"]["removed"] == ["shop/web"] and http.get("/v1/policies").json() == []
    assert ("delete_policy", "*", None, None, False) in agent.calls


def test_metrics_is_prometheus_text(http):
    r = http.get("/v1/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "stockade_policy_revision 0" in r.text


def test_keep_alive_serves_several_requests_on_one_connection(server):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.socket_path)
        f = s.makefile("rb")
        for _ in range(3):
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert f.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(f.read(length))["status"] == "ok"


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("method,path,kw,status,field,text", [
    ("POST", "/v1/endpoints", {"content": b"{bad"}, 400, None, "not valid JSON"),
    ("POST", "/v1/endpoints", {"json": [1]}, 400, None, "JSON object"),
    ("POST", "/v1/endpoints", {}, 400, None, "required"),
    ("POST", "/v1/endpoints", {"json": {**EP, "colour": "red"}}, 400, "colour", "unknown field"),
    ("POST", "/v1/endpoints", {"json": {"name": "a", "interface": "b"}}, 400, "ips", "required"),
    ("POST", "/v1/endpoints", {"json": {**EP, "ips": "10.0.0.1"}}, 400, "ips", "a list"),
    ("POST", "/v1/endpoints", {"json": {**EP, "ips": [1]}}, 400, "ips[0]", "string"),
    ("POST", "/v1/endpoints", {"json": {**EP, "audit": 1}}, 400, "audit", "true or false"),
    ("POST", "/v1/endpoints", {"json": {**EP, "labels": {"a": 1}}}, 400, "labels.a", "string"),
    ("POST", "/v1/endpoints", {"json": {**EP, "ips": ["nope"]}}, 400, "ips[0]", "not an IP"),
    ("POST", "/v1/endpoints", {"content": b"{}", "headers": {"content-type": "text/plain"}},
     415, "Content-Type", "application/json"),
    ("POST", "/v1/ipcache", {"json": {"prefix": "10.0.0.0/8"}}, 400, "labels", "required"),
    ("POST", "/v1/ipcache", {"json": {"prefix": "x", "labels": {"a": "b"}}}, 400, "prefix", ""),
    ("PUT", "/v1/policies", {"json": {"files": [{"name": "a"}]}}, 400, "files[0].text",
     "files[0]: text is required"),
    ("PUT", "/v1/policies", {"json": {"files": [{"name": "a", "text": 1}]}}, 400,
     "files[0].text", "must be a string"),
    ("PUT", "/v1/policies", {"json": {"files": {}}}, 400, "files", "must be a list"),
    ("POST", "/v1/endpoints", {"json": {**EP, "labels": 5}}, 400, "labels",
     "an object or a string"),
    ("POST", "/v1/endpoints", {"json": {"name": "a", "ips": []}}, 400, "interface",
     "interface or mac is required"),
    ("POST", "/v1/endpoints", {"json": {**EP, "name": None}}, 400, "name", "not null"),
    ("POST", "/v1/ipcache", {"json": {"prefix": "10.0.0.0/8", "node": "yes"}}, 400, "node",
     "true or false"),
    ("PUT", "/v1/services", {"json": {"services": {"web": 1}}}, 400, "services.web",
     "an object"),
    ("POST", "/v1/review", {"json": {"files": [], "replace_all": "no"}}, 400, "replace_all",
     "true or false"),
    ("POST", "/v1/review", {"json": {"files": [], "force": True}}, 400, "force", "unknown field"),
    ("POST", "/v1/review", {"json": {}}, 400, "files", "required"),
    ("GET", "/v1/trace?src=app=a&dst=app=b", {}, 400, "dport", "required"),
    ("GET", "/v1/trace?src=app=a&dst=&dport=80/tcp", {}, 400, "dst", "must not be empty"),
    ("GET", "/v1/trace?src=app=a&dst=app=b&dport=http", {}, 400, None, "http"),
    ("GET", "/v1/trace?src=nolabel&dst=app=b&dport=80/tcp", {}, 400, None, "key=value"),
    ("GET", "/v1/trace?src=endpoint:nope&dst=app=b&dport=80/tcp", {}, 404, "src", "nope"),
    ("GET", "/v1/matrix?limit=5000", {}, 400, "limit", "at most 1000"),
    ("GET", "/v1/matrix?offset=-1", {}, 400, "offset", "at least 0"),
    ("GET", "/v1/matrix?offset=x", {}, 400, "offset", "an integer"),
    ("GET", "/v1/flows?last=0", {}, 400, "last", "at least 1"),
    ("GET", "/v1/flows?follow=1", {}, 400, "follow", "true"),
    ("PUT", "/v1/policies", {"json": {"file": []}}, 400, "file", "unknown field"),
    ("PUT", "/v1/policies?dry_run=yes", {"json": {"files": []}}, 400, "dry_run", "true"),
    ("PUT", "/v1/policies?force=true", {"json": {"files": []}}, 400, "force", "unknown query"),
    ("PUT", "/v1/policies?dry_run=true&dry_run=false", {"json": {"files": []}}, 400, "dry_run",
     "twice"),
    ("GET", "/v1/health?verbose=1", {}, 400, "verbose", "unknown query parameter"),
    ("GET", "/v1/health", {"content": b"x"}, 400, None, "takes no request body"),
    ("DELETE", "/v1/policies/web?kind=Pod", {}, 400, "kind", "kind must be"),
    ("DELETE", "/v1/policies/%2A", {}, 400, "name", "DELETE /v1/policies"),
    ("DELETE", "/v1/policies/nope", {}, 404, "name", "nope"),
    ("GET", "/v1/nothing", {}, 404, None, "no such API route"),
    ("GET", "/v1/health/", {}, 404, None, "no such API route"),
    ("GET", "/v2/health", {}, 404, None, "no such API route"),
    ("PATCH", "/v1/health", {}, 405, None, "allowed: GET"),
    ("GET", "/v1/endpoints/web1", {}, 405, None, "allowed: DELETE"),
], ids=lambda v: v if isinstance(v, (str, int)) and not isinstance(v, bool) else None)
def test_refusals(http, method, path, kw, status, field, text):
    err = assert_error(http.request(method, path, **kw), status, field, text)
    assert set(err) >= {"message", "field"}


def test_405_names_allowed_methods(http):
    r = http.request("PUT", "/v1/endpoints")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


def test_policy_errors_carry_every_problem(http, agent):
    bad = POLICY.replace('port: "80"', 'port: "http2"')
    r = http.put("/v1/policies", json={"files": [{"name": "web.yaml", "text": bad}]})
    err = assert_error(r, 400, "spec.ingress[0].toPorts[0].ports[0].port", "web.yaml")
    assert err["errors"][0]["file"] == "web.yaml" and err["errors"][0]["name"] == "web"
    assert agent.policies == {}


def test_body_over_the_limit_is_413(agent, tmp_path):
    with APIServer(agent, str(tmp_path / "a.sock"), limits=Limits(root_body=1024)) as s, \
            httpx.Client(transport=httpx.HTTPTransport(uds=s.socket_path),
                         base_url="http://x") as c:
        r = c.put("/v1/policies", content=b"x" * 2048, headers={"content-type": "application/json"})
        assert_error(r, 413, None, "over the limit of 1024 bytes for root")
        ok = c.put("/v1/policies", content=b'{"files": []}' + b" " * 1000,
                   headers={"content-type": "application/json"})
        assert ok.status_code == 200, ok.text
    assert not any(call[0] == "put_policies" and call[1] != [] for call in agent.calls)


def test_chunked_request_body_is_411(http):
    r = http.put("/v1/policies", content=iter([b'{"files": []}']),
                 headers={"content-type": "application/json"})
    assert_error(r, 411, None, "Content-Length")


@pytest.mark.parametrize("exc,status", [
    (InvalidRequest("bad", "x"), 400),
    (PolicyError("spec", "bad"), 400),
    (PolicyErrors([PolicyError("spec", "bad")]), 400),
    (SelectorError("bad selector"), 400),
    (PermissionDenied("needs root"), 403),
    (NotFound("none", "name"), 404),
    (Conflict("taken", "name"), 409),
    (HTTPError(413, "too big"), 413),
    (CapacityError("policy map", "full"), 507),
    (DatapathError("policy map", "write failed"), 500),
    (IdentityError("identity store is read-only"), 500),
    (StockadeError("something"), 500),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None)
def test_error_classes_carry_their_status(exc, status):
    assert status_for(exc) == status
    assert status_for(RuntimeError("not ours")) == 500


@pytest.mark.parametrize("exc,status", [
    (Conflict("taken", "name"), 409),
    (CapacityError("policy map", "a delta of 9 entries does not fit"), 507),
    (StockadeError("identity store is read-only"), 500),
], ids=["conflict", "capacity", "stockade-error"])
def test_agent_errors_map_to_status(http, agent, exc, status):
    agent.fail_next = exc
    assert_error(http.get("/v1/health"), status, exc.field, str(exc))


def test_unexpected_exception_is_a_generic_500(http, agent, caplog):
    agent.fail_next = RuntimeError("secret internal state 0xdead")
    err = assert_error(http.get("/v1/endpoints"), 500, None, "internal error")
    assert "0xdead" not in err["message"]
    assert "0xdead" in caplog.text, "the traceback goes to the log"
    assert http.get("/v1/endpoints").status_code == 200, "the server keeps serving"


def test_malformed_request_line_gets_a_json_error(server):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.socket_path)
        s.sendall(b"GARBAGE\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):  # the server closes after an error like this
            data += chunk
    assert data.startswith(b"HTTP/1.1 400") or data.startswith(b"HTTP/1.0 400")
    assert b'"error"' in data


# ---------------------------------------------------------------- permissions
# (the permission table, limits, caps and timeouts: tests/test_api_limits.py)

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid to nobody")
def test_non_root_peer_may_read_but_not_change(agent):
    """A forked child that drops to nobody (SO_PEERCRED is real here): GET, a dry run and
    a review work, POST is 403."""
    d = tempfile.mkdtemp()
    os.chmod(d, 0o755)
    with APIServer(agent, os.path.join(d, "agent.sock"), group=None, mode=0o666) as s:
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: no pytest from here on, only os._exit
            code = 1
            try:
                os.close(rd)
                os.setgid(65534)
                os.setuid(65534)
                with httpx.Client(transport=httpx.HTTPTransport(uds=s.socket_path),
                                  base_url="http://x") as c:
                    get = c.get("/v1/health").status_code
                    files = {"files": [{"name": "web.yaml", "text": POLICY}]}
                    dry = c.put("/v1/policies?dry_run=true", json=files).status_code
                    review = c.post("/v1/review", json=files).status_code
                    post = c.post("/v1/endpoints", json=EP)
                os.write(wr, json.dumps([get, dry, review, post.status_code,
                                         post.json()]).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(wr)
        out = os.read(rd, 65536)
        os.close(rd)
        _, status = os.waitpid(pid, 0)
    assert status == 0
    get, dry, review, post, body = json.loads(out)
    assert (get, dry, review, post) == (200, 200, 200, 403)
    assert "uid 65534" in body["error"]["message"]
    assert not any(c[0] == "add_endpoint" for c in agent.calls)


# ---------------------------------------------------------------- socket handling

def test_socket_mode_and_stale_socket(agent, tmp_path):
    path = str(tmp_path / "agent.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a file nobody listens on
    with APIServer(agent, path, group="no-such-group-here", mode=0o660) as s:
        assert os.stat(path).st_mode & 0o777 == 0o660
        with pytest.raises(StockadeError, match="another process is serving"):
            APIServer(agent, path).start()
        assert os.path.exists(s.socket_path)
    assert not os.path.exists(path)


def test_refuses_to_remove_a_regular_file(agent, tmp_path):
    path = tmp_path / "agent.sock"
    path.write_text("not a socket")
    with pytest.raises(StockadeError, match="not a socket"):
        APIServer(agent, str(path)).start()
    assert path.read_text() == "not a socket"


# ---------------------------------------------------------------- streaming hook

def test_streaming_route_sends_chunks(server, http):
    def follow(r):
        return Response(body=iter([b'{"n": 1}\n', b"", b'{"n": 2}\n']),
                        content_type="application/x-ndjson")
    server.add_route(Route("GET", "/v1/test-stream", follow))
    with http.stream("GET", "/v1/test-stream") as r:
        assert r.headers["transfer-encoding"] == "chunked"
        lines = list(r.iter_lines())
    assert [json.loads(x)["n"] for x in lines] == [1, 2]
    assert http.get("/v1/health").status_code == 200, "connection reusable after a stream"


def test_stream_stops_when_server_stops(server, http):
    def forever(r):
        while True:
            yield b"tick\n"
            r.server.stopping.set()  # as stop() would; the handler ends the stream
    server.add_route(Route("GET", "/v1/test-forever", lambda r: Response(body=forever(r))))
    with http.stream("GET", "/v1/test-forever") as r:
        assert list(r.iter_lines()) == ["tick"]


# ---------------------------------------------------------------- the document

def test_openapi_documents_exactly_the_routes():
    """The route table and the document agree: the same (method, path) pairs, and a 403
    is documented exactly where a member can be refused (every route that is not READ).
    Query parameters and bodies are the document's own (the server validates with it)."""
    with open(OPENAPI) as f:
        doc = yaml.safe_load(f)
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops
                  if m in ("get", "post", "put", "delete", "patch")}
    served = {(r.method, r.template) for r in srv.ROUTES}
    assert documented == served
    for r in srv.ROUTES:
        op = doc["paths"][r.template][r.method.lower()]
        assert ("403" in op["responses"]) == (r.access is not Access.READ), r.template


def test_flow_filters_are_one_table():
    """GET /v1/flows takes exactly the flow filter keys (stockade.flows.filters.KEYS),
    plus follow and limit; the list-valued ones may repeat."""
    from stockade.flows.filters import KEYS, LIST_KEYS
    with open(OPENAPI) as f:
        op = yaml.safe_load(f)["paths"]["/v1/flows"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == set(KEYS) | {"follow", "limit"}
    assert {n for n, p in params.items() if p["schema"].get("type") == "array"} == \
        set(LIST_KEYS) | {f"not_{k}" for k in LIST_KEYS}


def test_the_package_ships_the_document():
    from stockade.daemon.apischema import load_document
    with open(OPENAPI) as f:
        assert load_document() == yaml.safe_load(f)


# ---------------------------------------------------------------- trace, matrix, review

def test_trace_uses_the_live_policy(http):
    text = POLICY.replace(", namespace: shop", "")
    http.put("/v1/policies", json={"files": [{"name": "web.yaml", "text": text}]})
    r = http.get("/v1/trace", params={"src": "app=lb", "dst": "app=web", "dport": "80/tcp"})
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["verdict"] == "allow" and t["ingress"]["policies"] == ["web"]
    r = http.get("/v1/trace", params={"src": "app=x", "dst": "app=web", "dport": "80/tcp"})
    assert r.json()["verdict"] == "deny"


def test_matrix_pages_and_defaults(http, agent):
    for i in range(3):
        http.post("/v1/endpoints", json={**EP, "name": f"web{i}", "interface": f"veth-web{i}",
                                          "ips": [f"10.0.0.{5 + i}"], "labels": {"app": "web", "n": str(i)}})
    r = http.get("/v1/matrix")
    assert r.status_code == 200 and (r.json()["offset"], r.json()["limit"]) == (0, 100)
    assert ("matrix", {"offset": 0, "limit": 100, "dst_offset": 0, "cidrs": False}) in agent.calls
    r = http.get("/v1/matrix", params={"label": "app=web", "offset": "1", "limit": "2",
                                       "port": "80/tcp"})
    m = r.json()
    assert len(m["rows"]) == 2 and m["total"] >= 3 and m["offset"] == 1
    assert ("matrix", {"label": "app=web", "port": "80/tcp", "offset": 1, "limit": 2, "dst_offset": 0,
                       "cidrs": False}) in agent.calls


def test_review_changes_nothing(http, agent):
    files = [{"name": "web.yaml", "text": POLICY}]
    r = http.post("/v1/review", json={"files": files, "replace_all": True})
    assert r.status_code == 200, r.text
    assert r.json()["diff"]["added"] == ["shop/web"]
    assert http.get("/v1/policies").json() == []
    assert ("review", files, True) in agent.calls
    bad = POLICY.replace('port: "80"', 'port: "http2"')
    err = assert_error(http.post("/v1/review", json={"files": [{"name": "w.yaml", "text": bad}]}),
                       400, "spec.ingress[0].toPorts[0].ports[0].port", "w.yaml")
    assert err["errors"][0]["file"] == "w.yaml"


def test_client_speaks_trace_matrix_and_review(server):
    from stockade.client import APIError, Client
    text = POLICY.replace(", namespace: shop", "")
    with Client(server.socket_path) as c:
        plan = c.review([{"name": "web.yaml", "text": text}], replace_all=True)
        assert plan["diff"]["added"] == ["web"] and c.policies() == []
        c.put_policies([{"name": "web.yaml", "text": text}])
        assert c.trace("app=lb", "app=web", "80/tcp")["verdict"] == "allow"
        assert c.matrix(limit=1)["limit"] == 1
        with pytest.raises(APIError) as e:
            c.matrix(limit=0)
        assert e.value.status == 400 and e.value.field == "limit"


def test_matrix_bounds_are_the_documents(http):
    """GET /v1/matrix's paging is what docs/api/openapi.yaml says (the server validates
    with it; the agent has no bounds of its own): limit 1..1000, default 100."""
    with open(OPENAPI) as f:
        params = {p["name"]: p["schema"] for p in
                  yaml.safe_load(f)["paths"]["/v1/matrix"]["get"]["parameters"]}
    top, default = params["limit"]["maximum"], params["limit"]["default"]
    assert (top, default) == (1000, 100)
    err = assert_error(http.get("/v1/matrix", params={"limit": top + 1}), 400, "limit")
    assert "at most 1000" in err["message"]
    assert_error(http.get("/v1/matrix", params={"dst_limit": top + 1}), 400, "dst_limit")
    assert_error(http.get("/v1/matrix", params={"offset": -1}), 400, "offset")
    r = http.get("/v1/matrix")
    assert r.status_code == 200 and (r.json()["limit"], r.json()["offset"]) == (default, 0)
    assert http.get("/v1/matrix", params={"limit": top}).json()["limit"] == top


@pytest.mark.parametrize("text, field, needle", [
    ("[" * 30000, "[0]" * 63, "nesting deeper than 64 levels"),
    (POLICY + "  egress: !!python/object/apply:os.system [true]\n", "spec.egress",
     "tag !!python/object/apply:os.system is not allowed"),
], ids=["30000-brackets", "python-tag"])
def test_hostile_policy_text_is_a_400_naming_the_path(http, agent, text, field, needle):
    r = http.put("/v1/policies", json={"files": [{"name": "bad.yaml", "text": text}]})
    err = assert_error(r, 400, field, "bad.yaml: document 0")
    assert needle in err["message"] and agent.policies == {}


@pytest.mark.parametrize("body, needle", [
    (b"[" * 100000, "nested too deeply"),
    (b'{"files": ' + b"9" * 5000 + b"}", "cannot be read"),
], ids=["deep", "huge-int"])
def test_hostile_json_bodies_are_a_400(server, body, needle):
    import http.client
    import socket as _socket

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            self.sock.connect(server.socket_path)

    c = Conn("localhost")
    c.request("PUT", "/v1/policies", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 400 and needle in r.read().decode()
