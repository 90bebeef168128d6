"""The Ansible modules' stdlib client and ``stockade.client.Client`` agree (issue 13.5).

``module_utils/stockade.py`` stays stdlib-only so that managed hosts need nothing but
Python, which makes it a second client of the same API. Every call it makes is made
here through both clients against the same live agent, and the answers compared: the
same data, the same errors with the same status and message.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from agentproc import AgentProcess
from netns import Topology
from stockade.client import APIError, Client

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
# The modules' client: in the collection once it moved there, else at the top level.
CANDIDATES = [ROOT / "ansible_collections/stockade/fleet/plugins/module_utils/stockade.py",
              ROOT / "module_utils/stockade.py"]

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]
"""
SERVICES = {"db": {"labels": {"tier": "data"}, "members": [{"endpoint": "muc-a"}]}}

# Fields that may differ between two reads a moment apart.
VOLATILE = {"uptime_s", "time", "last_event_age_s", "since", "age_s"}


def _module_utils():
    path = next(p for p in CANDIDATES if p.exists())
    spec = importlib.util.spec_from_file_location("stockade_module_utils_contract", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _metric_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}


@pytest.fixture(scope="module")
def clients():
    mu = _module_utils()
    with Topology("muc") as topo, AgentProcess() as agent:
        w = topo.add_workload("a", ["10.213.41.1/24"])
        yield mu, mu.AgentClient(agent.socket, timeout=30), Client(agent.socket, timeout=30), w


def _same_reads(m, c):
    assert _stable(m.health()) == _stable(c.health())
    assert m.endpoints() == c.endpoints()
    assert m.identities() == c.identities()
    assert m.ipcache() == c.ipcache()
    assert m.policies() == c.policies()
    assert m.services() == c.services()
    assert _metric_names(m.metrics()) == _metric_names(c.metrics())


def _same_error(mu, call_m, call_c):
    with pytest.raises(mu.AgentRefused) as got_m:
        call_m()
    with pytest.raises(APIError) as got_c:
        call_c()
    assert (got_m.value.status, got_m.value.msg, got_m.value.field) == \
        (got_c.value.status, str(got_c.value), got_c.value.field)


def test_every_call_agrees_with_the_client(clients):
    mu, m, c, w = clients
    _same_reads(m, c)

    # endpoints: added by one, seen alike by both, removed by the other
    spec = {"name": "muc-a", "interface": w.host_if, "ips": [w.ip4], "labels": {"app": "db"}}
    added = m.add_endpoint(spec)
    listed = c.endpoints()
    assert [e["name"] for e in listed] == ["muc-a"] and added["id"] == listed[0]["id"]
    _same_reads(m, c)
    _same_error(mu, lambda: m.add_endpoint(dict(spec, name="muc-b", ips=["10.213.41.300"])),
                lambda: c.add_endpoint(name="muc-b", interface=w.host_if, ips=["10.213.41.300"],
                                       labels={"app": "db"}))

    # policies: the same dry run through both, then applied by one, deleted by the other
    files = [{"name": "db.yaml", "text": POLICY}]
    assert _stable(m.put_policies(files, dry_run=True)) == _stable(c.put_policies(files, dry_run=True))
    applied = m.put_policies(files)
    assert applied["changed"] and m.policies() == c.policies() != []
    assert _stable(m.put_policies(files)) == _stable(c.put_policies(files))   # both unchanged
    _same_reads(m, c)
    assert _stable(m.delete_policy("db", dry_run=True)) == _stable(c.delete_policy("db", dry_run=True))
    c.delete_policy("db")
    _same_error(mu, lambda: m.delete_policy("db"), lambda: c.delete_policy("db"))

    # ipcache: added by the client, removed by the module's client
    c.add_ipcache("10.213.42.0/24", {"app": "web"}, host="h2")
    _same_reads(m, c)
    m.remove_ipcache("10.213.42.0/24")
    assert m.ipcache() == c.ipcache()
    _same_error(mu, lambda: m.remove_ipcache("10.213.42.0/24"),
                lambda: c.remove_ipcache("10.213.42.0/24"))
    added = m.add_ipcache({"prefix": "10.213.43.0/24", "labels": {"app": "web"}, "host": "h3"})
    assert added == next(e for e in c.ipcache() if e["prefix"] == "10.213.43.0/24")
    c.remove_ipcache("10.213.43.0/24")

    # services
    assert _stable(m.put_services(SERVICES, dry_run=True)) == _stable(c.put_services(SERVICES, dry_run=True))
    m.put_services(SERVICES)
    _same_reads(m, c)
    c.put_services({})
    assert m.services() == c.services()

    # a refused request is refused alike
    _same_error(mu, lambda: m.put_policies([{"name": "bad.yaml", "text": POLICY.replace('"5432"', '"x"')}]),
                lambda: c.put_policies([{"name": "bad.yaml", "text": POLICY.replace('"5432"', '"x"')}]))

    m.remove_endpoint("muc-a")
    _same_error(mu, lambda: m.remove_endpoint("muc-a"), lambda: c.remove_endpoint("muc-a"))
    _same_reads(m, c)
    assert c.endpoints() == []
