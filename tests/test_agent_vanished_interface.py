"""A link event for an interface that is gone by the time the agent attaches to it (a
container that exited at once): the change is rolled back and nothing is reported as a
failure, while any other failed attach still is. The real agent in-process over the
recording datapath; the kernel's ENODEV -> InterfaceGone is tests/root/test_datapath.py."""
from __future__ import annotations

from inprocess_agent import inprocess_agent
from stockade.daemon.links import Link
from stockade.datapath.errors import DatapathError, InterfaceGone


def _link(ifindex: int) -> Link:
    return Link(ifindex, f"veth-gone{ifindex}", None, "veth", "02:00:00:00:00:01")


def _failing(api, exc):
    def attach_interface(ifindex):
        raise exc(ifindex)
    api.agent.dp.attach_interface = attach_interface


def test_an_interface_gone_before_its_attach_is_no_error(tmp_path):
    api = inprocess_agent(str(tmp_path), managed_interfaces=["veth-gone*"])
    _failing(api, InterfaceGone)
    api.agent.on_link("new", _link(901))
    assert api.health()["errors"] == []
    assert 901 not in api.agent.attached


def test_any_other_failed_attach_is_still_an_error(tmp_path):
    api = inprocess_agent(str(tmp_path), managed_interfaces=["veth-gone*"])
    _failing(api, lambda i: DatapathError(f"ifindex {i}", "cannot attach programs (tc): EPERM"))
    api.agent.on_link("new", _link(902))
    errors = api.health()["errors"]
    assert errors and "cannot attach programs" in errors[0]
    assert 902 not in api.agent.attached
