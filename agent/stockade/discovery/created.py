"""What Podman's create events said about each container: its name, image and labels.

The OCI hook (stockade/hook.py) hands a container to the agent while ``podman start``
holds the container's lock, so the agent cannot ask Podman about it then (an inspect
waits for that lock). The create event, written to the events log before any start,
carries what identifies the container; the watcher's events-log thread notes it here and
the hook's request waits for it (bounded) when it has not been read yet. Every full
listing also adds the containers that exist but were created while nobody read the log
(``seed``: before the agent started).

Only records from the events log are noted: there ``Attributes`` are exactly the
container's labels. The API stream mixes ``name`` and ``image`` into them.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

MAX_CREATED = 4096   # containers remembered (the oldest go first); a miss falls back to events


@dataclass(frozen=True)
class CreatedContainer:
    id: str
    name: str
    image: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)


class CreatedContainers:
    """Thread-safe, bounded: ``note`` from the events-log thread, ``wait`` from API threads."""

    def __init__(self, limit: int = MAX_CREATED) -> None:
        self._limit = limit
        self._items: OrderedDict[str, CreatedContainer] = OrderedDict()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def note(self, event: dict) -> None:
        """Take a Docker-shaped event from podman_events.to_docker_event: a create is
        remembered, a remove forgotten; anything else is ignored."""
        if event.get("source") != "events-log":
            return
        action, cid = event.get("Action"), event.get("id")
        if not isinstance(cid, str) or not cid:
            return
        if action == "remove":
            with self._cond:
                self._items.pop(cid, None)
            return
        if action != "create":
            return
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        labels = {str(k): str(v) for k, v in attrs.items()} if isinstance(attrs, dict) else {}
        item = CreatedContainer(cid, str(event.get("Name") or ""), str(event.get("Image") or ""),
                                labels)
        with self._cond:
            self._items.pop(cid, None)
            self._items[cid] = item
            while len(self._items) > self._limit:
                self._items.popitem(last=False)
            self._cond.notify_all()

    def seed(self, summary: dict) -> None:
        """A container of a full listing (a /containers/json summary: its labels exactly),
        remembered unless its create event already was: containers created while the
        events log was not read (before the agent started)."""
        cid, labels = summary.get("Id"), summary.get("Labels") or {}
        if not isinstance(cid, str) or not cid or not isinstance(labels, dict):
            return
        names = summary.get("Names") or [""]
        name = str(names[0] if isinstance(names, list) and names else "").lstrip("/")
        item = CreatedContainer(cid, name, str(summary.get("Image") or ""),
                                {str(k): str(v) for k, v in labels.items()})
        with self._cond:
            if cid in self._items:
                return
            self._items[cid] = item
            while len(self._items) > self._limit:
                self._items.popitem(last=False)
            self._cond.notify_all()

    def get(self, cid: str) -> CreatedContainer | None:
        with self._cond:
            return self._items.get(cid)

    def wait(self, cid: str, timeout: float) -> CreatedContainer | None:
        """The container's create record, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                item = self._items.get(cid)
                left = deadline - time.monotonic()
                if item is not None or left <= 0:
                    return item
                self._cond.wait(left)
