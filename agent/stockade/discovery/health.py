"""How a discovery source is doing, for ``stockade status``: connected or not (since
when), its last event, its last full listing, and its errors.

The watcher's threads update it (single attribute writes); readers take ``to_dict()``.
"""
from __future__ import annotations

import threading
import time


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class SourceHealth:
    def __init__(self, name: str, where: str):
        self.name, self.where = name, where
        self.connected = False
        self.since: float | None = None        # when ``connected`` last changed
        self.last_event: float | None = None
        self.last_sync: float | None = None
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.retrying = 0                      # inspects waiting to be tried again
        self._lock = threading.Lock()

    def up(self) -> None:
        with self._lock:
            if not self.connected:
                self.connected, self.since = True, time.time()

    def down(self, why: str) -> None:
        with self._lock:
            if self.connected or self.since is None:
                self.connected, self.since = False, time.time()
        self.error(why)

    def event(self) -> None:
        self.last_event = time.time()

    def synced(self) -> None:
        self.last_sync = time.time()
        self.up()

    def error(self, why: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error, self.last_error_at = why, time.time()

    def to_dict(self) -> dict:
        return {"name": self.name, "where": self.where, "connected": self.connected,
                "since": _iso(self.since), "last_event": _iso(self.last_event),
                "last_sync": _iso(self.last_sync), "errors": self.errors,
                "last_error": self.last_error, "last_error_at": _iso(self.last_error_at),
                "retrying": self.retrying}
