"""The API's answer, the maps and the state agree: a change whose state cannot be
written (a full disk) is undone in the maps, the model and the identity numbers, on the
real agent in-process (tests/inprocess_agent.py) over a recording datapath. The same
with a real full filesystem and real maps: tests/root/test_agent_state.py."""
from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from recording_datapath import RecordingDatapath
from stockade.daemon.agent import Agent
from stockade.daemon.api import AgentAPI
from stockade.daemon.config import AgentConfig
from stockade.daemon.links import Link
from stockade.daemon.statecheck import check_state
from stockade.daemon.statefiles import POLICY_FILE, policy_file
from stockade.errors import StateError

pytestmark = pytest.mark.pure


def doc(name: str, spec: str) -> dict:
    return {"name": f"{name}.yaml", "text": f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
                                           f"metadata: {{name: {name}}}\nspec:\n{spec}"}


DB = doc("db", """\
  endpointSelector: {matchLabels: {app: db}}
  ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: "5432", protocol: TCP}]}]}]
""")
WEB = doc("web", """\
  endpointSelector: {matchLabels: {app: web}}
  egress: [{toEndpoints: [{matchLabels: {app: db}}]}, {toCIDR: [192.0.2.0/24]}]
  egressDeny: [{toCIDR: [198.51.100.7/32]}]
""")
LINKS = [Link(10 + i, f"v{n}", None, "veth", f"02:00:00:00:00:{i:02x}")
         for i, n in enumerate(("web", "db", "new", "other"))]


def start(state_dir) -> AgentAPI:
    cfg = AgentConfig(state_dir=str(state_dir), host_name="h1", podman_socket=None,
                      docker_socket=None, podman_events_log=None)
    agent = Agent(cfg)
    agent.links.update({link.ifindex: link for link in LINKS})   # the host's links, as netlink gave them
    agent.start(RecordingDatapath(), watch_links=False, watch_runtimes=False, flows=False)
    return AgentAPI(agent)


def add(api, name, app, ip):
    return api.add_endpoint({"name": name, "interface": f"v{name}", "ips": [ip], "labels": {"app": app}})


@pytest.fixture
def api(tmp_path):
    a = start(tmp_path / "state")
    add(a, "web", "web", "10.9.0.2")
    add(a, "db", "db", "10.9.0.3")
    a.add_ipcache({"prefix": "10.8.0.9", "labels": {"app": "web"}, "host": "h2"})
    a.put_policies([DB])
    yield a
    a.agent.stop()


def picture(api) -> dict:
    """Everything the change may touch: the maps, the model, the state files."""
    a, dp = api.agent, api.agent.dp
    d = a.store.dir
    return copy.deepcopy({
        "maps": (dp.policy, dp.flags, dp.ipcache, dp.endpoints, dp.attached),
        "model": (sorted(a.engine.policies), a.state.revision, sorted(a.state.endpoints),
                  dict(a.state.ipcache), a.alloc.numbers(), sorted(a.engine.identities)),
        "files": {n: (d / n).read_bytes() for n in sorted(os.listdir(d))},
    })


CHANGES = {
    "policy-with-cidrs": lambda a: a.put_policies([WEB]),
    "policy-delete": lambda a: a.delete_policy("db"),
    "endpoint-new": lambda a: add(a, "new", "cache", "10.9.0.4"),
    "endpoint-relabel": lambda a: add(a, "db", "vault", "10.9.0.3"),
    "endpoint-remove": lambda a: a.remove_endpoint("web"),
    "ipcache-put": lambda a: a.add_ipcache({"prefix": "10.8.1.0/24", "labels": {"app": "x"}}),
    "ipcache-remove": lambda a: a.remove_ipcache("10.8.0.9"),
    "services": lambda a: a.set_services({"bk": {"members": [{"endpoint": "db"}],
                                                 "cidrs": ["203.0.113.0/24"]}}),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_change_whose_state_cannot_be_written_is_undone_everywhere(api, monkeypatch, change):
    before = picture(api)
    writes = len(api.agent.dp.log)
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StateError) as err:
        change(api)
    monkeypatch.setattr(os, "write", real_write)
    assert err.value.http_status == 507 and "the previous state is kept" in str(err.value)
    assert len(api.agent.dp.log) > writes, "the change was written to the maps before the state"
    assert picture(api) == before
    assert any("failed, previous state kept" in e for e in api.health()["errors"])
    # with space again the same change goes through, and a restart finds what it left
    change(api)
    after = picture(api)
    assert after != before
    again = start(api.agent.store.dir)
    try:
        assert picture(again)["model"] == after["model"]
        assert picture(again)["maps"][:4] == after["maps"][:4]
    finally:
        again.agent.stop()


def test_a_dry_run_keeps_no_identity_numbers(api):
    before = api.agent.alloc.numbers()
    api.put_policies([WEB], dry_run=True)
    assert api.agent.alloc.numbers() == before


def test_a_damaged_state_stops_the_start_before_the_datapath(tmp_path):
    state = tmp_path / "state"
    a = start(state)
    add(a, "web", "web", "10.9.0.2")
    a.put_policies([DB])
    a.agent.stop()
    shard = policy_file({"kind": "CiliumNetworkPolicy", "metadata": {"name": "db"}})   # db's file
    (state / shard).write_text("{}")
    cfg = AgentConfig(state_dir=str(state), host_name="h1", podman_socket=None,
                      docker_socket=None, podman_events_log=None)
    agent, dp = Agent(cfg), RecordingDatapath()
    with pytest.raises(StateError, match=rf"{shard}: \$: \{{\}} is not of type 'array'"):
        agent.start(dp, watch_links=False, watch_runtimes=False, flows=False)
    assert dp.log == [] and agent.dp is None


RECORDS = [
    ("policies.json", [{"document": {"kind": "CiliumNetworkPolicy"}}],
     f"{policy_file({'kind': 'CiliumNetworkPolicy'})}: document 0: stored policy cannot be read"),
    ("identities.json", {"a": 300, "b": 300}, "identities.json: identity 300 is given to two label sets"),
    ("endpoints.json", [{"name": "a", "id": 1, "interface": "x", "ips": ["nope"], "labels": {}}],
     "endpoints.json: [0] (a): 'nope' does not appear to be an IPv4 or IPv6 address"),
    ("endpoints.json", [{"name": "a", "id": 1, "interface": "x", "ips": [], "labels": {"reserved:host": ""}}],
     "endpoints.json: [0] (a): labels.reserved:host: reserved labels cannot be given to endpoints"),
    ("endpoints.json", [{"name": "a", "id": 1, "interface": "x", "ips": [], "labels": {}},
                        {"name": "a", "id": 2, "interface": "y", "ips": [], "labels": {}}],
     "endpoints.json: [1] (a): its name or id is given twice"),
    ("ipcache.json", [{"prefix": "10.0.0.1/8", "labels": {"app": "x"}}],
     "ipcache.json: [0]: 10.0.0.1/8 has host bits set"),
    ("services.json", {"s": {"cidrs": ["10.0.0.1/8"]}}, "services.json: $: services.s.cidrs[0]: "),
]


@pytest.mark.parametrize("name,data,message", RECORDS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(RECORDS)])
def test_a_record_the_schema_admits_but_the_agent_cannot_read_refuses_the_start(tmp_path, name, data,
                                                                                message):
    from stockade.daemon.store import StateStore
    state = tmp_path / "state"
    StateStore(state).commit({name: data})
    cfg = AgentConfig(state_dir=str(state), host_name="h1", podman_socket=None,
                      docker_socket=None, podman_events_log=None)
    agent, dp = Agent(cfg), RecordingDatapath()
    with pytest.raises(StateError) as err:
        agent.start(dp, watch_links=False, watch_runtimes=False, flows=False)
    assert str(err.value).startswith(f"{state}/{message}"), str(err.value)
    assert dp.log == []


def test_a_new_link_whose_binding_cannot_be_written_stays_attached_and_closed(tmp_path, monkeypatch):
    """Undoing never opens: the link an endpoint waited for appears, the record that now
    names its MAC cannot be written, and the link is left closed, not unfiltered."""
    from stockade.daemon.changes import LinkChange
    api = start(tmp_path / "state")
    api.add_endpoint({"name": "late", "interface": "vlate", "ips": ["10.9.0.9"], "labels": {"app": "x"}})
    link = Link(20, "vlate", None, "veth", "02:00:00:00:00:20")
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(StateError):
        api.agent.submit(LinkChange("new", link))
    monkeypatch.undo()
    dp = api.agent.dp
    assert 20 in dp.attached and dp.endpoints[20]["unidentified"] is True
    assert api.list_endpoints()[0]["state"] == "waiting-for-interface"
    api.agent.stop()


def shards(d) -> dict[str, int]:
    return {n: os.stat(d / n).st_ino for n in os.listdir(d) if POLICY_FILE.match(n)}


def file_of(name: str) -> str:
    return policy_file({"kind": "CiliumNetworkPolicy", "metadata": {"name": name}})


def test_a_one_policy_change_writes_the_shard_of_that_policy_only(tmp_path):
    api = start(tmp_path / "state")
    try:
        spec = "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: p%d}}]}]\n"
        api.put_policies([doc(f"p{i}", spec % i) for i in range(100)])
        d = api.agent.store.dir
        before = shards(d)
        api.put_policies([doc("p5", spec % 55)])
        after = shards(d)
        assert {n for n in after if after[n] != before.get(n)} == {file_of("p5")}
        assert len(after) == len(before) > 20
    finally:
        api.agent.stop()
    again = start(tmp_path / "state")
    try:
        assert len(again.agent.engine.policies) == 100
        assert shards(d) == after                        # a start writes nothing it read
    finally:
        again.agent.stop()


FORMAT_1 = Path(__file__).parent / "data" / "state-format-1"   # see tests/test_state_store.py


def test_a_state_of_format_1_is_checked_as_it_is_and_written_as_format_2_at_start(tmp_path):
    state = tmp_path / "state"
    shutil.copytree(FORMAT_1, state)
    cfg = AgentConfig(state_dir=str(state), host_name="h1", podman_socket=None,
                      docker_socket=None, podman_events_log=None)
    reports = check_state(cfg)
    assert [r.line() for r in reports] == [
        "current (#6): ok: 2 policies, revision 2, 2 endpoints, 7 identities",
        "generation 1 (#6): ok: 2 policies, revision 2, 2 endpoints, 7 identities",
        "generation 2 (#5): ok: 2 policies, revision 2, 2 endpoints, 5 identities",
        "generation 3 (#4): ok: 1 policies, revision 1, 2 endpoints, 3 identities"]
    assert sorted(os.listdir(state)) == sorted(os.listdir(FORMAT_1))        # checking wrote nothing
    api = start(state)
    try:
        manifest = json.loads((state / "state.json").read_text())
        assert (manifest["format"], manifest["generation"]) == (2, 7)
        assert sorted(shards(state)) == sorted({file_of("db"), file_of("web")})
        assert not (state / "policies.json").exists()
        assert sorted(p.name for p in api.agent.engine.policies) == ["db", "web"]
        api.delete_policy("web")
    finally:
        api.agent.stop()
    assert [r.line() for r in check_state(cfg)] == [
        "current (#8): ok: 1 policies, revision 3, 2 endpoints, 7 identities",
        "generation 1 (#8): ok: 1 policies, revision 3, 2 endpoints, 7 identities",
        "generation 2 (#7): ok: 2 policies, revision 2, 2 endpoints, 7 identities",
        "generation 3 (#6): ok: 2 policies, revision 2, 2 endpoints, 7 identities"]   # #6: format 1
