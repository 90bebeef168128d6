"""Turn a Docker-compatible runtime's containers into WorkloadEvents.

Two ways to consume a DockerWatcher:

* ``for ev in watcher.events(stop_event): ...`` - a blocking generator. It
  first yields "added" for every running container, then live changes. Set
  stop_event (from any thread) to end it promptly; the generator aborts its
  HTTP stream, it does not wait for the next event.
* ``watcher.start(callback, stop_event)`` - the same loop in a daemon thread,
  calling callback(event) for each event.

Latency: a "start" (or Podman "init") event is inspected and yielded right
away, on the reading thread, before any other event is read.

Reconnects: when the socket disappears the generator retries with
exponential backoff (0.1 s doubling to 5 s) and, once connected again,
re-lists containers and yields the difference (removed for vanished
containers, added for new or changed ones), so nothing is lost in the gap.
With give_up_after set, it raises RuntimeUnavailable after that many seconds
without a connection instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from .docker_api import EVENT_ACTIONS, DockerAPI, EventStream, workload_from_inspect
from .errors import DiscoveryError, RuntimeUnavailable
from .workload import Workload, WorkloadEvent

log = logging.getLogger(__name__)

_ADD_ACTIONS = frozenset({"init", "start", "restart"})
_REMOVE_ACTIONS = frozenset({"die", "stop", "remove"})
_CHECK_ACTIONS = frozenset({"kill"})  # a signal, not always a death: ask the runtime


class DockerWatcher:
    """Watch one Docker-API socket (Docker or Podman's compat service).

    runtime_name is put in every Workload.runtime ("podman", "docker").
    resolve_veth=False skips the netlink lookup of the host veth (no root).
    """

    BACKOFF_MIN = 0.1
    BACKOFF_MAX = 5.0

    def __init__(
        self,
        socket_path: str,
        runtime_name: str,
        *,
        resolve_veth: bool = True,
        api: DockerAPI | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.runtime_name = runtime_name
        self.resolve_veth = resolve_veth
        self._api = api or DockerAPI(socket_path)
        # Set once events() has listed the running containers after connecting
        # (readiness for the agent; tests wait on it before starting containers).
        self.synced = threading.Event()

    def close(self) -> None:
        self._api.close()

    # -- one-shot ------------------------------------------------------------

    def inspect(self, container_id: str) -> Workload | None:
        """The workload for one container, or None if it is gone or not running."""
        data = self._api.inspect(container_id)
        if not data:
            return None
        state = data.get("State") or {}
        if not state.get("Pid") and not state.get("Running"):
            return None  # created or exited: no process, no netns to police
        return workload_from_inspect(self.runtime_name, data, resolve_veth=self.resolve_veth)

    def snapshot(self) -> list[Workload]:
        """Every running container, inspected; sorted by ID."""
        found = []
        for summary in self._api.list_containers():
            workload = self.inspect(summary["Id"])
            if workload is not None:
                found.append(workload)
        return sorted(found, key=lambda w: w.id)

    # -- streaming -----------------------------------------------------------

    def start(
        self, callback: Callable[[WorkloadEvent], None], stop_event: threading.Event
    ) -> threading.Thread:
        """Run events(stop_event) in a daemon thread, calling callback per event."""

        def loop() -> None:
            for event in self.events(stop_event):
                callback(event)

        thread = threading.Thread(target=loop, name=f"stockade-watch-{self.runtime_name}", daemon=True)
        thread.start()
        return thread

    def events(
        self, stop_event: threading.Event | None = None, *, give_up_after: float | None = None
    ) -> Iterator[WorkloadEvent]:
        """Yield added/removed events until stop_event is set (see module doc)."""
        stop_event = stop_event or threading.Event()
        known: dict[str, Workload] = {}
        current: list[EventStream | None] = [None]
        done = threading.Event()
        waker = threading.Thread(
            target=self._abort_on_stop, args=(stop_event, done, current), daemon=True,
            name="stockade-watch-stop",
        )
        waker.start()
        backoff = self.BACKOFF_MIN
        down_since: float | None = None
        try:
            while not stop_event.is_set():
                try:
                    stream = self._api.events()
                except RuntimeUnavailable:
                    now = time.monotonic()
                    down_since = down_since or now
                    if give_up_after is not None and now - down_since >= give_up_after:
                        raise
                    log.warning("%s: %s not answering, retrying in %.1fs",
                                self.runtime_name, self.socket_path, backoff)
                    stop_event.wait(backoff)
                    backoff = min(backoff * 2, self.BACKOFF_MAX)
                    continue
                down_since, backoff = None, self.BACKOFF_MIN
                current[0] = stream
                if stop_event.is_set():
                    stream.abort()
                try:
                    # Stream first, then list: a change in between shows up in both,
                    # and the upsert/dedup below makes that harmless.
                    yield from self._resync(known)
                    self.synced.set()
                    for raw in stream:
                        event = self._translate(raw, known)
                        if event is not None:
                            yield event
                except RuntimeUnavailable as exc:
                    log.warning("%s: %s", self.runtime_name, exc)
                finally:
                    current[0] = None
                    stream.close()
        finally:
            done.set()

    @staticmethod
    def _abort_on_stop(stop_event: threading.Event, done: threading.Event, current: list) -> None:
        # Polls done so the thread also ends when the caller drops the generator
        # without setting stop_event.
        while not done.is_set():
            if stop_event.wait(0.25):
                stream = current[0]
                if stream is not None:
                    stream.abort()
                return

    def _resync(self, known: dict[str, Workload]) -> Iterator[WorkloadEvent]:
        try:
            now = {w.id: w for w in self.snapshot()}
        except DiscoveryError as exc:
            log.warning("%s: resync failed: %s", self.runtime_name, exc)
            raise RuntimeUnavailable(self.socket_path, f"resync failed: {exc}") from exc
        for cid in sorted(set(known) - set(now)):
            yield WorkloadEvent("removed", known.pop(cid))
        for cid, workload in sorted(now.items()):
            if known.get(cid) != workload:
                known[cid] = workload
                yield WorkloadEvent("added", workload)

    def _translate(self, raw: dict, known: dict[str, Workload]) -> WorkloadEvent | None:
        if raw.get("Type", raw.get("type")) not in (None, "container"):
            return None
        action = raw.get("Action") or raw.get("status") or ""
        if action not in EVENT_ACTIONS:
            return None  # exec_*, cleanup, health_status, attach, ...
        cid = (raw.get("Actor") or {}).get("ID") or raw.get("id")
        if not cid:
            return None
        if action in _ADD_ACTIONS:
            try:
                workload = self.inspect(cid)
            except DiscoveryError as exc:
                log.warning("%s: inspect %s after %s: %s", self.runtime_name, cid[:12], action, exc)
                return None
            if workload is None or known.get(cid) == workload:
                return None
            known[cid] = workload
            return WorkloadEvent("added", workload)
        if action in _CHECK_ACTIONS and cid in known:
            try:
                if self.inspect(cid) is not None:
                    return None
            except DiscoveryError:
                pass
            return WorkloadEvent("removed", known.pop(cid))
        if action in _REMOVE_ACTIONS and cid in known:
            return WorkloadEvent("removed", known.pop(cid))
        return None
