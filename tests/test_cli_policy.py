"""The offline policy commands: validate, trace, test; exit codes and JSON shapes."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from stockade.cli.main import cli

DEMO = Path(__file__).resolve().parent.parent / "inventories" / "demo"
POLICIES = sorted(str(p) for p in (DEMO / "policies").glob("*.yaml"))

BAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: good}
spec: {endpointSelector: {}, ingress: [{fromEntities: [host]}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad}
spec:
  endpointSelector: {}
  ingress:
    - toPorts: [{ports: [{port: "http2"}]}]
"""


def run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def bad_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(BAD)
    return str(p)


def test_validate_ok():
    r = run("policy", "validate", *POLICIES)
    assert r.exit_code == 0, r.output
    assert "policies" in r.output


def test_validate_json():
    r = run("policy", "validate", "-o", "json", *POLICIES)
    data = json.loads(r.output)
    assert data["valid"] and {p["name"] for p in data["policies"]} >= {"frontend", "api", "db"}


def test_validate_bad_names_file_document_and_path(bad_file):
    r = run("policy", "validate", bad_file)
    assert r.exit_code == 1
    assert (f"{bad_file}: document 1 (bad): spec.ingress[0].toPorts[0].ports[0].port: "
            "'http2' is not a port number") in r.output


def test_validate_bad_json_error(bad_file):
    r = run("policy", "validate", "-o", "json", bad_file)
    assert r.exit_code == 1
    err = json.loads(r.output)["error"]
    assert err["field"] == "spec.ingress[0].toPorts[0].ports[0].port"
    assert err["errors"][0]["document"] == 1 and err["errors"][0]["name"] == "bad"


def test_usage_error_exits_2():
    assert run("policy", "trace", "--src", "app=web").exit_code == 2
    assert run("policy", "nope").exit_code == 2


@pytest.mark.parametrize("src,dst,port,verdict,egress,ingress", [
    ("app=api", "app=db", "5432/tcp", "allow", ["api"], ["db"]),
    ("app=frontend", "app=db", "5432/tcp", "deny", ["baseline", "frontend"], ["baseline", "db"]),
    ("cidr:198.51.100.7/32", "app=frontend", "80/tcp", "allow", [], ["frontend"]),
    ("cidr:198.51.100.7/32", "app=db", "5432/tcp", "deny", [], ["db"]),
    ("entity:host", "app=db", "8/icmp", "allow", [], ["baseline"]),
], ids=["allowed", "default-deny", "world-allowed", "deny-rule", "icmp"])
def test_trace_json(src, dst, port, verdict, egress, ingress):
    r = run("policy", "trace", "-o", "json", "--src", src, "--dst", dst, "--dport", port, *POLICIES)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["verdict"] == verdict
    assert data["egress"]["policies"] == egress
    assert data["ingress"]["policies"] == ingress


def test_trace_deny_rule_names_rule():
    r = run("policy", "trace", "-o", "json", "--src", "cidr:198.51.100.7/32", "--dst", "app=db",
            "--dport", "5432/tcp", *POLICIES)
    ing = json.loads(r.output)["ingress"]
    assert ing["verdict"] == "deny" and ing["rules"] == [
        {"policy": "db", "rule": "spec.ingressDeny[0]", "verdict": "deny"}]


def test_trace_human():
    r = run("policy", "trace", "--src", "app=frontend", "--dst", "app=api", "--dport", "8080/tcp", *POLICIES)
    assert r.exit_code == 0 and "Final verdict: ALLOW" in r.output


@pytest.mark.parametrize("args,msg", [
    (["--src", "app", "--dst", "app=db", "--dport", "80/tcp"], "is not key=value"),
    (["--src", "cidr:300.0.0.0/8", "--dst", "app=db", "--dport", "80/tcp"], "cidr:300.0.0.0/8"),
    (["--src", "entity:moon", "--dst", "app=db", "--dport", "80/tcp"], "entity must be one of"),
    (["--src", "app=web", "--dst", "app=db", "--dport", "80/xtp"], "expected PORT/PROTO"),
    (["--src", "app=web", "--dst", "app=db", "--dport", "70000/tcp"], "out of range"),
], ids=["no-value", "bad-cidr", "bad-entity", "bad-proto", "bad-port"])
def test_trace_invalid_input_exits_1(args, msg):
    r = run("policy", "trace", *args, *POLICIES)
    assert r.exit_code == 1 and msg in r.output


def test_policy_test_pass():
    r = run("policy", "test", str(DEMO / "policy_tests.yaml"), *POLICIES)
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("8 passed, 0 failed")


def test_policy_test_failure_report(tmp_path):
    t = tmp_path / "t.yaml"
    t.write_text("- {from: {app: frontend}, to: {app: db}, port: 5432/tcp, expect: allow}\n"
                 "- {from: app=api, to: app=db, port: 5432/tcp, expect: allow}\n")
    r = run("policy", "test", str(t), *POLICIES)
    assert r.exit_code == 1
    assert "FAIL  app=frontend -> app=db 5432/tcp: expected allow, got deny" in r.output
    assert "1 passed, 1 failed" in r.output


def test_policy_test_bad_case_names_path(tmp_path):
    t = tmp_path / "t.yaml"
    t.write_text("- {from: app=api, to: app=db, port: 5432, expect: allow}\n"
                 "- {from: app=api, to: app=db, port: 5432/tcp, expect: maybe, color: red}\n")
    r = run("policy", "test", str(t), *POLICIES)
    assert r.exit_code == 1
    assert f"{t}: [0].port" in r.output and f"{t}: [1].color: unknown field" in r.output
    assert f"{t}: [1].expect: must be allow or deny" in r.output


def test_policy_test_with_http_requests(tmp_path):
    pol = tmp_path / "api.yaml"
    pol.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: api}\n"
                   "spec:\n  endpointSelector: {matchLabels: {app: api}}\n  ingress:\n"
                   "    - fromEndpoints: [{matchLabels: {app: web}}]\n"
                   "      toPorts: [{ports: [{port: '8080', protocol: TCP}],\n"
                   "                 rules: {http: [{method: GET, path: '/api/.*'}]}}]\n")
    t = tmp_path / "t.yaml"
    t.write_text("- {from: app=web, to: app=api, port: 8080/tcp, expect: allow,\n"
                 "   http: {method: GET, path: /api/x, headers: ['X-Token: s3cret']}}\n"
                 "- {from: app=web, to: app=api, port: 8080/tcp, expect: allow,\n"
                 "   http: {method: DELETE, path: /api/x}}\n")
    r = run("policy", "test", str(t), str(pol))
    assert r.exit_code == 1, r.output
    assert "PASS  app=web -> app=api 8080/tcp GET /api/x: expected allow, got allow" in r.output
    assert "FAIL  app=web -> app=api 8080/tcp DELETE /api/x: expected allow, got deny" in r.output
    assert "no rule of port 8080 matches DELETE /api/x: the proxy answers 403" in r.output
    r = run("policy", "test", "-o", "json", str(t), str(pol))
    results = json.loads(r.output)["results"]
    assert results[1]["http"]["method"] == "DELETE" and results[1]["got"] == "deny"
    t.write_text("- {from: app=web, to: app=api, port: 8080/tcp, expect: deny,\n"
                 "   http: {method: GET, headers: [{X-Token: s3cret}]}}\n")
    r = run("policy", "test", str(t), str(pol))
    assert r.exit_code == 1 and f"{t}: [0].http.headers[0]: must be a string" in r.output
