"""Optional flow log: one JSON object per line (the API's Flow shape), rotated by size.

For log shippers and SIEMs. ``max_bytes`` 0 disables rotation; ``backups`` files
(``path.1`` ... ``path.N``) are kept, the oldest is deleted.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
from pathlib import Path


class FlowLog:
    def __init__(self, path: str, max_bytes: int = 100 * 1024 * 1024, backups: int = 5):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._log = logging.Logger(f"stockade.flowlog.{path}", logging.INFO)
        self._log.propagate = False
        self._log.addHandler(self._handler)

    def write(self, flows) -> None:
        """Write an iterable of Flow dicts, one line each."""
        info = self._log.info
        for f in flows:
            info(json.dumps(f, separators=(",", ":")))

    def close(self) -> None:
        self._log.removeHandler(self._handler)
        self._handler.close()
