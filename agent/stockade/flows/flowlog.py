"""Optional flow log: one JSON object per line (the API's Flow shape), rotated by size.

For log shippers and SIEMs. ``max_bytes`` 0 disables rotation; ``backups`` files
(``path.1`` ... ``path.N``) are kept, the oldest is deleted.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
from pathlib import Path

CHUNK = 65536     # characters of lines written at once


class FlowLog:
    def __init__(self, path: str, max_bytes: int = 100 * 1024 * 1024, backups: int = 5):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # at most a 16th of a file per chunk: files still fill to within 1/16 of max_bytes
        self.chunk = min(CHUNK, max(1, max_bytes // 16)) if max_bytes else CHUNK
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._log = logging.Logger(f"stockade.flowlog.{path}", logging.INFO)
        self._log.propagate = False
        self._log.addHandler(self._handler)

    def write(self, flows) -> None:
        """Write an iterable of Flow dicts, one line each. Lines go to the handler in
        chunks of up to ``chunk`` characters (one write, one rotation check each, not
        one per flow); a file is rotated before a chunk that would take it past
        ``max_bytes``."""
        info, dumps, limit = self._log.info, json.dumps, self.chunk
        lines: list[str] = []
        size = 0
        for f in flows:
            line = dumps(f, separators=(",", ":"))
            if lines and size + len(line) >= limit:
                info("\n".join(lines))
                lines, size = [], 0
            lines.append(line)
            size += len(line) + 1
        if lines:
            info("\n".join(lines))

    def close(self) -> None:
        self._log.removeHandler(self._handler)
        self._handler.close()
