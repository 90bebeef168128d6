"""Label sources cannot be forged: the pure rules (daemon/labelsources.py) and every place
that applies them without a kernel (static specs, service definitions, the Docker API's
image labels, the runtime source, the record, the metric, the CLI)."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.core import CounterMetricFamily

from fake_agent import FakeAgent
from stockade.cli.main import cli
from stockade.daemon.endpoints import Endpoint, parse_spec
from stockade.daemon.inventory import parse_services
from stockade.daemon.labelsources import MAX_LISTED, MAX_TEXT, DroppedLabel, admit_labels
from stockade.daemon.metrics import _labels_dropped
from stockade.daemon.runtimes import RuntimeSource
from stockade.daemon.server import APIServer
from stockade.discovery import DockerAPI, DockerWatcher, Workload, WorkloadEvent
from stockade.discovery.libvirt import parse_metadata
from stockade.errors import InvalidRequest
from stockade.policy.labels import LabelSet

IMAGE_ID = "sha256:" + "ab" * 32


# ---------------------------------------------------------------- the rule

@pytest.mark.parametrize("source,raw,kept,dropped", [
    ("podman", {"app": "db"}, ["container:app=db"], []),
    ("podman", {"container:app": "db"}, ["container:app=db"], []),
    ("docker", {"app": "db", "tier": ""}, ["container:app=db", "container:tier"], []),
    ("podman", {"static:role": "gateway"}, [], [("static:role=gateway", "other-source")]),
    ("podman", {"service:service": "payments"}, [], [("service:service=payments", "other-source")]),
    ("docker", {"libvirt:app": "db"}, [], [("libvirt:app=db", "other-source")]),
    ("podman", {"k8s:io.kubernetes.pod.namespace": "x"}, [],
     [("k8s:io.kubernetes.pod.namespace=x", "other-source")]),
    ("podman", {"any:app": "db"}, [], [("any:app=db", "other-source")]),
    ("podman", {"podman:app": "db"}, [], [("podman:app=db", "other-source")]),
    ("podman", {"reserved:host": ""}, [], [("reserved:host", "reserved")]),
    ("podman", {"bad key": "v"}, [], [("bad key=v", "invalid")]),
    ("podman", {"app": "a value with spaces"}, [], [("app=a value with spaces", "invalid")]),
    ("podman", {"com.example:x": "1"}, [], [("com.example:x=1", "invalid")]),
    ("podman", {"app": "db", "container:app": "web"}, ["container:app=db"],
     [("container:app=web", "invalid")]),
    ("libvirt", {"app": "db", "libvirt:tier": "back"}, ["libvirt:app=db", "libvirt:tier=back"], []),
    ("libvirt", {"container:app": "db"}, [], [("container:app=db", "other-source")]),
    ("libvirt", {"static:role": "gateway"}, [], [("static:role=gateway", "other-source")]),
    ("static", {"role": "gateway", "static:zone": "a"}, ["static:role=gateway", "static:zone=a"], []),
    ("static", {"container:app": "db"}, [], [("container:app=db", "other-source")]),
], ids=["plain", "own-prefix", "empty-value", "static", "service", "libvirt", "k8s", "any",
        "podman-prefix", "reserved", "bad-key", "bad-value", "unknown-source", "twice",
        "libvirt-plain", "libvirt-container", "libvirt-static", "static-own", "static-container"])
def test_admit_labels(source, raw, kept, dropped):
    labels, out = admit_labels(raw, source)
    assert labels.to_strings() == kept
    assert [(d.label, d.cause) for d in out] == dropped


def test_other_source_reason_names_both_sources():
    _, [d] = admit_labels({"static:role": "gateway"}, "podman")
    assert d.to_dict() == {"label": "static:role=gateway", "cause": "other-source",
                           "reason": "source static is not container: labels of containers "
                                     "have source container"}


@pytest.mark.parametrize("container,image,kept,dropped", [
    ({"app": "db"}, {"app": "db"}, [], [("app=db", "image")]),
    ({"app": "web"}, {"app": "db"}, ["container:app=web"], []),           # the operator's own value
    ({"app": "db", "tier": "back"}, {"app": "db"}, ["container:tier=back"], [("app=db", "image")]),
    ({"static:role": "gateway"}, {"static:role": "gateway"}, [], [("static:role=gateway", "other-source")]),
    ({"org.opencontainers.image.title": "a b"}, {"org.opencontainers.image.title": "a b"}, [],
     [("org.opencontainers.image.title=a b", "invalid")]),
], ids=["from-image", "overridden", "mixed", "image-other-source", "image-invalid"])
def test_image_labels_are_not_trusted(container, image, kept, dropped):
    labels, out = admit_labels(container, "podman", image_labels=image)
    assert labels.to_strings() == kept
    assert [(d.label, d.cause) for d in out] == dropped
    trusted, _ = admit_labels(container, "podman", image_labels=None)
    assert set(labels) <= set(trusted)


def test_hostile_labels_are_bounded_and_typed():
    labels, out = admit_labels({"k": "v" * 10_000, 7: "x", "n": {"a": 1}, "none": None}, "docker")
    assert labels.to_strings() == ["container:none"]
    assert sorted(d.cause for d in out) == ["invalid", "invalid", "invalid"]
    assert all(len(d.label) <= MAX_TEXT and len(d.reason) <= 2 * MAX_TEXT for d in out)
    ep = Endpoint("c", 1, "veth0", ("10.0.0.2",), labels,
                  dropped_labels=admit_labels({f"static:k{i}": "v" for i in range(500)}, "podman")[1])
    assert len(ep.dropped_labels) == MAX_LISTED


_keys = st.one_of(st.text(max_size=80),
                  st.sampled_from(["app", "container:app", "static:role", "service:service",
                                   "reserved:host", "any:app", "libvirt:vm", "k8s:x", "cidr:y"]),
                  st.integers())
_values = st.one_of(st.text(max_size=300), st.none(), st.integers(), st.booleans(),
                    st.lists(st.text(max_size=3), max_size=2))


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(_keys, _values, max_size=12),
       image=st.one_of(st.none(), st.dictionaries(st.text(max_size=20), st.text(max_size=20))),
       endpoint_source=st.sampled_from(["podman", "docker", "libvirt", "static"]))
def test_admit_labels_takes_anything_and_forges_nothing(raw, image, endpoint_source):
    """Whatever a source gives: no exception, each key kept or dropped once, every kept
    label of the endpoint's own source, every drop explained and bounded."""
    labels, dropped = admit_labels(raw, endpoint_source, image_labels=image)
    own = {"podman": "container", "docker": "container"}.get(endpoint_source, endpoint_source)
    assert all(l.source == own for l in labels)
    assert len(labels) + len(dropped) == len(raw)
    assert all(d.cause in ("other-source", "reserved", "invalid", "image") and d.reason
               and len(d.label) <= MAX_TEXT and len(d.reason) <= 2 * MAX_TEXT for d in dropped)
    assert len({l.key for l in labels}) == len(labels)     # one value per key


# ---------------------------------------------------------------- the sources

def test_libvirt_metadata_keys_get_source_libvirt():
    meta = """<stockade:endpoint xmlns:stockade="https://stockade.dev/xmlns/endpoint/1">
      <stockade:label key="app">db</stockade:label>
      <stockade:label key="static:role">gateway</stockade:label>
      <stockade:label key="reserved:host"></stockade:label>
    </stockade:endpoint>"""
    raw, _, _ = parse_metadata(meta)
    labels, dropped = admit_labels(raw, "libvirt")
    assert labels.to_strings() == ["libvirt:app=db"]
    assert [(d.label, d.cause) for d in dropped] == [("reserved:host", "reserved"),
                                                      ("static:role=gateway", "other-source")]


def test_static_spec_drops_other_sources():
    s = parse_spec({"name": "gw", "interface": "veth0", "ips": ["10.0.0.2"],
                    "labels": {"role": "gateway", "container:app": "db", "service:service": "pay"}})
    assert s["labels"].to_strings() == ["static:role=gateway"]
    assert sorted(d.label for d in s["dropped_labels"]) == ["container:app=db", "service:service=pay"]


@pytest.mark.parametrize("labels,field,message", [
    ({"reserved:host": ""}, "labels.reserved:host", "reserved labels cannot be given"),
    ({"bad key": "v"}, "labels.bad key", "not a valid label key"),
    ({"app": ["x"]}, "labels.app", "must map to a string"),
    ("app", "labels", "not key=value"),
], ids=["reserved", "bad-key", "not-a-string", "not-key-value"])
def test_static_spec_refuses_reserved_and_invalid(labels, field, message):
    with pytest.raises(InvalidRequest) as exc:
        parse_spec({"name": "gw", "interface": "veth0", "ips": ["10.0.0.2"], "labels": labels})
    assert exc.value.field == field and message in str(exc.value)


@pytest.mark.parametrize("labels,field,message", [
    ({"static:role": "gateway"}, "services.pay.labels.static:role", "label source 'static' is not service"),
    ({"container:app": "db"}, "services.pay.labels.container:app", "label source 'container' is not service"),
    ({"k8s:app": "db"}, "services.pay.labels.k8s:app", "always have source service"),
    ({"service": "other"}, "services.pay.labels.service", "added automatically"),
    ({"service:service": "other"}, "services.pay.labels.service:service", "added automatically"),
    (["tier"], "services.pay.labels", "must be a mapping"),
    ({"tier": {"a": 1}}, "services.pay.labels.tier", "must map to a string"),
], ids=["static", "container", "k8s", "name", "prefixed-name", "list", "nested"])
def test_service_labels_of_another_source_are_refused(labels, field, message):
    with pytest.raises(InvalidRequest) as exc:
        parse_services({"pay": {"labels": labels, "cidrs": ["192.0.2.0/24"]}})
    assert exc.value.field == field and message in str(exc.value)


def test_service_labels_may_name_their_own_source():
    svc = parse_services({"pay": {"labels": {"service:tier": "back", "zone": "a"},
                                  "cidrs": ["192.0.2.0/24"]}})["pay"]
    assert svc.labels.to_strings() == ["service:service=pay", "service:tier=back", "service:zone=a"]


# ---------------------------------------------------------------- Docker API: image labels

def _docker(handler) -> DockerAPI:
    return DockerAPI("/nonexistent.sock", transport=httpx.MockTransport(handler))


def test_image_labels_are_read_once_per_image_id():
    seen = []

    def handler(req):
        seen.append(req.url.path)
        return httpx.Response(200, json={"Id": IMAGE_ID, "Config": {"Labels": {"app": "db"}}})

    api = _docker(handler)
    assert api.image_labels(IMAGE_ID) == {"app": "db"}
    assert api.image_labels(IMAGE_ID[7:]) == {"app": "db"}      # bare hex is the same ID
    assert seen == [f"/v1.41/images/{IMAGE_ID}/json"]
    assert api.image_labels("") == {}                           # --rootfs: no image
    assert api.image_labels("localhost/bb:latest") is None      # names move: never by name
    assert seen == [f"/v1.41/images/{IMAGE_ID}/json"]


def test_missing_image_is_unknown():
    assert _docker(lambda req: httpx.Response(404, json={"message": "no such image"})
                   ).image_labels(IMAGE_ID) is None


def test_watcher_inspect_carries_the_image_labels():
    def handler(req):
        if req.url.path.startswith("/v1.41/images/"):
            return httpx.Response(200, json={"Config": {"Labels": {"app": "db"}}})
        if req.url.path.startswith("/v1.41/containers/"):
            return httpx.Response(200, json={
                "Id": "c" * 64, "Name": "/web", "Image": IMAGE_ID,
                "Config": {"Image": "localhost/db:1", "Labels": {"app": "db", "tier": "x"}},
                "State": {"Pid": 42, "Running": True},
                "NetworkSettings": {"IPAddress": "10.88.0.5"}})
        return httpx.Response(500, json={"message": "unexpected " + req.url.path})

    w = DockerWatcher("/nonexistent.sock", "docker", resolve_veth=False,
                      api=_docker(handler)).inspect("c" * 64)
    assert w.labels == {"app": "db", "tier": "x"} and w.image_labels == {"app": "db"}


def test_watcher_inspect_with_unreadable_image_gives_unknown_labels():
    def handler(req):
        if req.url.path.startswith("/v1.41/images/"):
            return httpx.Response(500, json={"message": "storage broken"})
        return httpx.Response(200, json={"Id": "c" * 64, "Name": "/web", "Image": IMAGE_ID,
                                         "Config": {"Labels": {"app": "db"}},
                                         "State": {"Pid": 42, "Running": True},
                                         "NetworkSettings": {"IPAddress": "10.88.0.5"}})

    w = DockerWatcher("/nonexistent.sock", "docker", resolve_veth=False,
                      api=_docker(handler)).inspect("c" * 64)
    assert w.image_labels is None


# ---------------------------------------------------------------- the runtime source

class _Watcher:
    def __init__(self):
        self.synced = threading.Event()

    def start(self, callback, stop_event):
        return None


class _Agent:
    """What RuntimeSource uses of the agent: records the changes it submits, and errors."""

    def __init__(self, trust: bool):
        self.config = type("Config", (), {"trust_image_labels": trust})()
        self.upserts, self.errors = [], []

    def submit(self, change):
        self.upserts.append(vars(change))

    def error(self, msg):
        self.errors.append(msg)


def _event(image_labels, runtime="podman"):
    return WorkloadEvent("added", Workload(
        runtime=runtime, id="c" * 64, name="forger", image="localhost/db:1",
        labels={"app": "db", "static:role": "gateway", "tier": "back"},
        image_labels=image_labels, ips=("10.88.0.5",), host_ifname="veth9", host_ifindex=9))


@pytest.mark.parametrize("trust,image_labels,kept,dropped", [
    (False, {"app": "db"}, ["container:tier=back"], ["app=db", "static:role=gateway"]),
    (True, {"app": "db"}, ["container:app=db", "container:tier=back"], ["static:role=gateway"]),
    (True, None, ["container:app=db", "container:tier=back"], ["static:role=gateway"]),
], ids=["untrusted", "trusted", "trusted-unknown-image"])
def test_runtime_source_gives_what_remains(trust, image_labels, kept, dropped):
    agent = _Agent(trust)
    RuntimeSource(agent, "podman", None, None, threading.Event(), watcher=_Watcher())._on_event(
        _event(image_labels))
    [up] = agent.upserts
    assert up["labels"].to_strings() == kept and up["source"] == "podman"
    assert sorted(d.label for d in up["dropped_labels"]) == dropped
    assert agent.errors == []


def test_container_with_unknown_image_labels_is_not_identified():
    agent = _Agent(trust=False)
    RuntimeSource(agent, "docker", None, None, threading.Event(), watcher=_Watcher())._on_event(
        _event(None, runtime="docker"))
    assert agent.upserts == []
    assert len(agent.errors) == 1 and "cannot be read" in agent.errors[0]


# ---------------------------------------------------------------- record, metric, CLI

def test_dropped_labels_survive_the_record():
    d = DroppedLabel("static:role=gateway", "source static is not container", "other-source")
    ep = Endpoint("c", 1, "veth0", ("10.0.0.2",), LabelSet.parse("app=web", "container"),
                  source="podman", dropped_labels=[d])
    rec = json.loads(json.dumps(ep.to_record()))
    assert rec["dropped_labels"] == [d.to_dict()]
    assert Endpoint.from_record(rec).dropped_labels == (d,)
    del rec["dropped_labels"]                      # a state file from before
    assert Endpoint.from_record(rec).dropped_labels == ()


def test_metric_starts_every_possible_pair_at_zero():
    fam = _labels_dropped({("podman", "image"): 3})
    assert isinstance(fam, CounterMetricFamily) and fam.name == "stockade_labels_dropped"
    values = {(s.labels["source"], s.labels["cause"]): s.value
              for s in fam.samples if s.name == "stockade_labels_dropped_total"}
    assert values[("podman", "image")] == 3
    assert values[("docker", "other-source")] == 0 and values[("static", "other-source")] == 0
    assert ("libvirt", "image") not in values      # VMs have no image
    assert {s for s, _ in values} == {"podman", "docker", "libvirt", "static"}


@pytest.fixture
def sock(tmp_path):
    with APIServer(FakeAgent(), str(tmp_path / "agent.sock")) as s:
        yield s.socket_path


def test_cli_reports_dropped_labels(sock):
    run = CliRunner(mix_stderr=False).invoke
    r = run(cli, ["endpoint", "add", "--name", "gw", "--interface", "veth-gw", "--ip", "10.0.0.5",
                  "--labels", "role=gateway,container:app=db", "--socket", sock])
    assert r.exit_code == 0, r.output
    assert "warning: label container:app=db dropped: source container is not static" in r.stderr
    r = run(cli, ["endpoint", "list", "--socket", sock])
    header, row = r.output.splitlines()[:2]
    assert header.split()[-2:] == ["DROPPED", "LABELS"] and row.split()[-2:] == ["1", "static:role=gateway"]
    [ep] = json.loads(run(cli, ["endpoint", "list", "-o", "json", "--socket", sock]).output)
    assert ep["dropped_labels"] == [{"label": "container:app=db", "cause": "other-source",
                                     "reason": "source container is not static: labels of static "
                                               "endpoints have source static"}]
