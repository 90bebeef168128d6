"""L7 (HTTP) parts of flow records.

An HTTP request through the proxy gives two flows, as Hubble shows them: a REQUEST and
a RESPONSE (with the status code and the latency). Their L3/L4 part is an ordinary row
(record.py); the HTTP part, strings of any length, lives in ``L7Table``, a bounded
side table of as many entries as the ring has rows, and the row's ``l7`` field names
its entry. An entry is only overwritten after ``capacity`` newer L7 rows, so a row
still in the ring finds its own (each entry carries its id; a row whose entry was
replaced meanwhile renders without the HTTP part rather than with another's).
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

ID_SPACE = 0xFFFFFFFF          # the row's l7 field is 32 bits; 0 means "no L7 part"


class L7Info(NamedTuple):
    kind: str                  # REQUEST | RESPONSE
    latency_ns: int
    method: str
    path: str                  # the request target as sent (path and query)
    host: str
    protocol: str              # HTTP/1.1
    code: int                  # 0 for a REQUEST
    headers: tuple[tuple[str, str], ...]

    @property
    def url(self) -> str:
        """Hubble's url: scheme, host and target."""
        return f"http://{self.host}{self.path}" if self.host else self.path


class L7Table:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids = [0] * capacity
        self._infos: list[L7Info | None] = [None] * capacity
        self._next = itertools.count()   # next() is atomic: writers need no lock

    def add(self, info: L7Info) -> int:
        """Store ``info``; returns its id (never 0) for the row's l7 field."""
        n = next(self._next)
        ident = n % ID_SPACE + 1
        slot = n % self.capacity
        self._infos[slot] = info
        self._ids[slot] = ident
        return ident

    def get(self, ident: int) -> L7Info | None:
        if not ident:
            return None
        slot = (ident - 1) % self.capacity
        info = self._infos[slot]
        return info if self._ids[slot] == ident else None


def to_l7_dict(info: L7Info) -> dict:
    """The Flow's ``l7`` (Hubble's field names)."""
    return {"type": info.kind, "latency_ns": info.latency_ns,
            "http": {"method": info.method, "url": info.url, "protocol": info.protocol,
                     "code": info.code,
                     "headers": [{"key": k, "value": v} for k, v in info.headers]}}
