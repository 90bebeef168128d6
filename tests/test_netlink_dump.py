"""A netlink dump the kernel interrupts (links changed meanwhile) is taken again: an
agent starting on a busy host failed its start with NetlinkDumpInterrupted."""
import pytest
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted

from stockade import netlink


def test_an_interrupted_dump_is_taken_again(monkeypatch):
    monkeypatch.setattr(netlink.time, "sleep", lambda s: None)
    calls = []

    def get_links(**kw):
        calls.append(kw)
        if len(calls) < 4:
            raise NetlinkDumpInterrupted()
        return iter(["lo", "eth0"])

    assert netlink.dump(get_links, family=2) == ["lo", "eth0"]
    assert calls == [{"family": 2}] * 4


def test_a_dump_interrupted_every_time_gives_up(monkeypatch):
    slept = []
    monkeypatch.setattr(netlink.time, "sleep", slept.append)

    def always():
        raise NetlinkDumpInterrupted()

    with pytest.raises(NetlinkDumpInterrupted):
        netlink.dump(always)
    assert len(slept) == netlink.ATTEMPTS - 1 and max(slept) <= 0.2
