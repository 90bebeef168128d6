"""The agent's state directory: what it persists, written atomically.

    identities.json   label set -> identity number (policy/identity.py)
    endpoints.json    endpoints, so a restarted agent re-adopts them
    ipcache.json      remote entries (other hosts' workloads)
    policies.json     the live policy documents with their sources
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import StockadeError


class StateStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o750)
        except OSError as exc:
            raise StockadeError(f"{self.dir}: cannot create state directory: {exc}") from exc

    def path(self, name: str) -> Path:
        return self.dir / name

    def read(self, name: str, default):
        p = self.path(name)
        if not p.exists():
            return default
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise StockadeError(f"{p}: cannot read state: {exc}") from exc

    def write(self, name: str, data) -> None:
        p = self.path(name)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, p)
        except OSError as exc:
            raise StockadeError(f"{p}: cannot write state: {exc}") from exc
