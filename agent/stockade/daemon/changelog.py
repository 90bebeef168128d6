"""The change log: every committed change as one JSON object, on stderr (journald) and in
``change_log_path`` when set (rotated at 10 MiB, 5 kept).

A line holds ``time``, ``uid`` and ``pid`` (the API peer's, from SO_PEERCRED; null for
the agent's own sources), ``source`` (``api``, ``podman``, ``docker``, ``libvirt``,
``netlink``, ``agent``), ``action`` (``policy.import``, ``policy.delete``,
``endpoint.upsert``, ``endpoint.remove``, ``endpoint.bind``, ``ipcache.put``,
``ipcache.delete``, ``services.set``), ``object`` (what it changed: a name, prefix or the
policies' names), ``revision`` (the policy revision after it) and ``summary``.
A request that changes nothing (the same endpoint again, a link that needs nothing)
writes no line.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging

from ..flows.flowlog import FlowLog

log = logging.getLogger("stockade.changes")
MAX_BYTES, BACKUPS = 10 * 1024 * 1024, 5

_peer: contextvars.ContextVar = contextvars.ContextVar("stockade_change_peer", default=None)


@contextlib.contextmanager
def acting(cred):
    """Changes submitted inside are the API peer's ``cred`` (routes.PeerCred)."""
    token = _peer.set(cred)
    try:
        yield
    finally:
        _peer.reset(token)


class ChangeLog:
    def __init__(self, path: str | None = None):
        self.path = path
        self._file = FlowLog(path, MAX_BYTES, BACKUPS) if path else None

    def record(self, change, txn, revision: int) -> dict | None:
        if not txn.log:
            return None
        cred = _peer.get()
        action, obj = change.describe()
        entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
                 .replace("+00:00", "Z"),
                 "uid": cred.uid if cred is not None else None,
                 "pid": cred.pid if cred is not None else None,
                 "source": "api" if cred is not None else change.origin(),
                 "action": action, "object": obj, "revision": revision,
                 "summary": "; ".join(txn.log)}
        log.info("%s", json.dumps(entry, separators=(",", ":")))
        if self._file is not None:
            self._file.write([entry])
        return entry

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
