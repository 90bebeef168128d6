"""A fake datapath for compiler tests: the BPF program's decision order, in Python.

It only makes compiler tests fast; the real-kernel tests under tests/root prove the
datapath itself.
"""
from __future__ import annotations

from stockade.policy.compiler import Compiler
from stockade.policy.mapstate import EGRESS, INGRESS, lookup


class FakeDatapath:
    def __init__(self, compiler: Compiler):
        self.c = compiler

    def side(self, local: int, peer: int, direction: int, proto: int, port: int | None) -> bool:
        if local not in self.c.local_ids:
            return True
        verdict, _ = lookup(self.c.entries, self.c.flags, local, peer, direction, proto, port)
        return verdict in ("allow", "not-enforced")

    def allowed(self, src: int, dst: int, proto: int, port: int | None) -> bool:
        """A new connection from src to dst: the source's egress and the destination's
        ingress must both allow it."""
        return self.side(src, dst, EGRESS, proto, port) and self.side(dst, src, INGRESS, proto, port)
