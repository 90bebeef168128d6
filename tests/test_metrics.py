"""Agent metrics without a kernel: one registry per agent with the process collectors, no
_created series, health gauges, and per-endpoint drop counters of bounded cardinality."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inprocess_agent import inprocess_agent
from stockade.daemon.metrics import registry
from stockade.flows.decode import ENDPOINT_SERIES, OTHER, UNIDENTIFIED, Decoder, Resolver
from stockade.flows.ring import FlowRing

pytestmark = pytest.mark.pure


def names(text):
    return {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}


def test_one_registry_per_agent_with_process_collectors(tmp_path):
    api = inprocess_agent(str(tmp_path))
    try:
        assert registry(api.agent) is registry(api.agent)
        first, second = names(api.metrics()), names(api.metrics())
        assert "process_cpu_seconds_total" in first and "python_info" in first
        assert "python_gc_objects_collected_total" in first
        assert not [n for n in first if n.endswith("_created")]
        assert first["stockade_build_info"].value == 1
        assert first["stockade_healthy"].value == 1 and first["stockade_errors_total"].value == 0
        api.agent.error("something broke")
        after = names(api.metrics())
        assert after["stockade_healthy"].value == 0 and after["stockade_errors_total"].value == 1
        assert second["process_start_time_seconds"].value == first["process_start_time_seconds"].value
    finally:
        api.agent.stop()


def test_endpoint_drop_series_are_bounded_and_forgotten():
    d = Decoder(FlowRing(16), Resolver(endpoints_by_ifindex={i: f"ep{i}" for i in range(1000)}))
    for i in range(1000):
        d._count_drop(f"ep{i}", 0)
        d._count_drop(f"ep{i}", 1)
    d._count_drop(None, 0)
    assert len(d.endpoint_drops) <= 2 * ENDPOINT_SERIES + 2
    assert d.endpoint_drops[(OTHER, 0)] + sum(n for (k, dr), n in d.endpoint_drops.items()
                                               if dr == 0 and k != OTHER) == 1001
    d.set_resolver(Resolver(endpoints_by_ifindex={1: "ep1"}))
    assert {k for k, _ in d.endpoint_drops} <= {"ep1", OTHER, UNIDENTIFIED}
    d._count_drop(None, 0)
    assert d.endpoint_drops[(UNIDENTIFIED, 0)] >= 1
