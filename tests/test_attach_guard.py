"""The attachment guard's repair decision (daemon/attachguard.py), on a stand-in agent:
an interface that vanished (a container exited) is let go, never reported as a failed
repair; one that exists and cannot be repaired is an error and degraded."""
from __future__ import annotations

import contextlib
import socket
from types import SimpleNamespace

from stockade.daemon.attachguard import AttachGuard
from stockade.errors import StockadeError


class _Datapath:
    def __init__(self):
        self.attachments = SimpleNamespace(mode="tc")
        self.attached_to: list[int] = []

    def attach_interface(self, ifindex):
        self.attached_to.append(ifindex)
        raise StockadeError("No such device")


class _Agent:
    def __init__(self, ifindex: int):
        self.dp = _Datapath()
        self.attached = {ifindex}
        self.links = {ifindex: SimpleNamespace(name="veth-x")}
        self.errors: list[str] = []
        self.degraded: list[tuple] = []
        self.kernel_default_calls: list[tuple] = []
        self.version = 0
        self.attach_repairs = 0

    def locked(self):
        return contextlib.nullcontext()

    def error(self, msg):
        self.errors.append(msg)

    def note_degraded(self, *args):
        self.degraded.append(args)

    def _kernel_default(self, op, ifindexes):
        self.kernel_default_calls.append((op, list(ifindexes)))


def _missing_ifindex() -> int:
    taken = {i for i, _ in socket.if_nameindex()}
    return next(i for i in range(1 << 20, 1 << 21) if i not in taken)


def test_a_vanished_interface_is_let_go_silently():
    idx = _missing_ifindex()
    agent = _Agent(idx)
    AttachGuard(agent)._repair(idx, [SimpleNamespace(hook="ingress", what="missing")])
    assert agent.attached == set() and agent.errors == [] and agent.degraded == []
    assert agent.dp.attached_to == []                 # no attach tried on a gone device
    assert agent.kernel_default_calls == [("unprotect", [idx])]


def test_an_existing_interface_that_cannot_be_repaired_is_an_error_and_degraded():
    idx = socket.if_nametoindex("lo")
    agent = _Agent(idx)
    AttachGuard(agent)._repair(idx, [SimpleNamespace(hook="ingress", what="missing")])
    assert agent.dp.attached_to == [idx]
    assert agent.errors and "cannot restore its programs" in agent.errors[0]
    assert agent.degraded and "not repaired" in agent.degraded[0][1]
    assert agent.attached == set()
