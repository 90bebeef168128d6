"""Errors raised by the datapath.

    StockadeError (stockade.errors, when present)
     └── DatapathError            any failure to build, load, attach or write maps (HTTP 500)
          └── CapacityError       a change would overflow a map; nothing was written (HTTP 507)

bcc exceptions and ``OSError`` never leave this package: they are translated into
``DatapathError`` with ``raise ... from exc`` so the original stays attached.
"""
from __future__ import annotations

from stockade.errors import StockadeError


class DatapathError(StockadeError):
    """The kernel datapath refused an operation. ``what`` names the object."""

    def __init__(self, what: str, msg: str):
        self.what = what
        self.msg = msg
        super().__init__(f"{what}: {msg}")


class InterfaceGone(DatapathError):
    """The interface went before its programs could be attached (a container that exited
    at once): nothing is left open, and its "del" event removes it from the model."""

    def __init__(self, ifindex: int):
        super().__init__(f"ifindex {ifindex}", "no such interface")


class CapacityError(DatapathError):
    """A delta would not fit in a map; the map was left unchanged (HTTP 507, Insufficient
    Storage)."""

    http_status = 507
