"""Per-task wall time for the host test: where an install or upgrade over SSH spends its
minutes under TCG. Writes ``{"task name": seconds}`` (slowest first) to the path in
``STOCKADE_TASK_TIMES``; prints nothing."""
from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: task_times
type: aggregate
short_description: per-task wall time, written to $STOCKADE_TASK_TIMES
description: Writes each task's wall time (summed over its loop items and hosts) as JSON.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "task_times"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._times: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def _close(self):
        if self._current is not None:
            name, started = self._current
            self._times[name] = self._times.get(name, 0.0) + time.monotonic() - started
            self._current = None

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._close()
        self._current = (task.get_name(), time.monotonic())

    v2_playbook_on_handler_task_start = v2_playbook_on_task_start

    def v2_playbook_on_stats(self, stats):
        self._close()
        path = os.environ.get("STOCKADE_TASK_TIMES")
        if path:
            ranked = sorted(self._times.items(), key=lambda kv: -kv[1])
            with open(path, "w") as f:
                json.dump({k: round(v, 1) for k, v in ranked}, f, indent=1)
