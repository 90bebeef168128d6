"""Turn a Docker-compatible runtime's containers into WorkloadEvents.

Two ways to consume a DockerWatcher:

* ``for ev in watcher.events(stop_event): ...`` - a blocking generator. It
  first yields "added" for every running container, then live changes. Set
  stop_event (from any thread) to end it promptly: the HTTP stream is aborted,
  nothing waits for the next event.
* ``watcher.start(callback, stop_event)`` - the same loop in a daemon thread,
  calling callback(event) for each event.

Threads: one reads the API's /events stream, an optional second one follows
Podman's event log file (events_log=, see podman_events.py); both only
queue raw events. The consuming thread does everything else (inspect, veth
lookup, bookkeeping), so no locks are needed.

Latency: an "init" (Podman) or "start" event is inspected and yielded as soon
as it is dequeued. Through Podman's API alone that is 0-250 ms after the
event, because the service polls its log; with events_log it is ~1 ms.
Duplicates (both sources, or a resync) are dropped: per container, events
not newer than the last one handled are ignored, and an "added" equal to the
known workload is not repeated.

Reconnects: when the socket disappears the reader retries with exponential
backoff (0.1 s doubling to 5 s); once connected again the consumer re-lists
containers and yields the difference (removed for vanished containers, added
for new or changed ones), so nothing is lost in the gap. With give_up_after
set, events() raises RuntimeUnavailable after that many seconds without a
connection instead.

Faults: an inspect that fails is tried again with backoff (0.2 s doubling to 5 s,
RETRIES times); a container's event counts as handled (its position, the event's
timestamp, moves on) only once it was inspected. A hung runtime answers nothing and
closes nothing: when the stream has been quiet for ``probe_interval`` seconds the
watchdog pings the API (2 s), and no answer aborts the stream, so the reader reconnects
and the consumer re-lists. Every ``relist_interval`` seconds the consumer lists all
containers again anyway (level-triggered: whatever was missed is found). ``health``
(health.SourceHealth) says how it is going; with ``sync_events`` every listing is
also yielded as a "synced" WorkloadEvent carrying every running workload.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from .created import CreatedContainers
from .docker_api import EVENT_ACTIONS, DockerAPI, EventStream, workload_from_inspect
from .errors import DiscoveryError, RuntimeAPIError, RuntimeUnavailable
from .health import SourceHealth
from .podman_events import PodmanEventsLog
from .workload import Workload, WorkloadEvent

log = logging.getLogger(__name__)

_ADD_ACTIONS = frozenset({"init", "start", "restart"})
_REMOVE_ACTIONS = frozenset({"die", "stop", "remove"})
_CHECK_ACTIONS = frozenset({"kill"})  # a signal, not always a death: ask the runtime

# Items on the internal queue: (_SYNC, None) after (re)connecting, (_RAW, event),
# (_FAIL, exc) when the reader gives up, (_STOP, None) when stop_event is set.
_SYNC, _RAW, _FAIL, _STOP = "sync", "raw", "fail", "stop"
RETRIES = 8                  # inspects of one event (then the next listing finds it)
RETRY_MIN, RETRY_MAX = 0.2, 5.0


class DockerWatcher:
    """Watch one Docker-API socket (Docker or Podman's compat service).

    runtime_name is put in every Workload.runtime ("podman", "docker").
    resolve_veth=False skips the netlink lookup of the host veth (no root).
    events_log: Podman's events.log to follow with inotify for low latency
    (Podman with events_logger="file" only); None uses the API stream alone.
    """

    BACKOFF_MIN = 0.1
    BACKOFF_MAX = 5.0
    PING_TIMEOUT = 2.0

    def __init__(
        self,
        socket_path: str,
        runtime_name: str,
        *,
        resolve_veth: bool = True,
        events_log: str | None = None,
        api: DockerAPI | None = None,
        probe_interval: float = 5.0,
        relist_interval: float = 60.0,
        sync_events: bool = False,
    ) -> None:
        self.socket_path = socket_path
        self.runtime_name = runtime_name
        self.resolve_veth = resolve_veth
        self.events_log = events_log
        self.probe_interval = probe_interval
        self.relist_interval = relist_interval
        self.sync_events = sync_events
        self._own_api = api is None
        self._api = api or DockerAPI(socket_path)
        # Set once events() has listed the running containers after connecting
        # (readiness for the agent; tests wait on it before starting containers).
        self.synced = threading.Event()
        self.health = SourceHealth(runtime_name, socket_path)
        # create events from the events log, for the OCI hook (created.py)
        self.created = CreatedContainers()
        self._last_data = time.monotonic()

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
        try:
            image_labels = self._api.image_labels(data.get("Image"))
        except RuntimeAPIError as exc:  # the agent reports the container (unknown image labels)
            log.warning("%s: image of %s: %s", self.runtime_name, container_id[:12], exc)
            image_labels = None
        return workload_from_inspect(self.runtime_name, data, resolve_veth=self.resolve_veth,
                                     image_labels=image_labels)

    def image_labels_by_name(self, ref: str) -> dict[str, str] | None:
        """DockerAPI.image_labels_by_name over this watcher's socket."""
        return self._api.image_labels_by_name(ref)

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
        halt = threading.Event()  # stop_event, or the generator was closed
        inbox: queue.Queue = queue.Queue()
        current: list[EventStream | None] = [None]
        threads = [
            threading.Thread(target=self._read_api, args=(halt, inbox, current, give_up_after),
                             name="stockade-watch-api", daemon=True),
            threading.Thread(target=self._wait_stop, args=(stop_event, halt, inbox, current),
                             name="stockade-watch-stop", daemon=True),
            threading.Thread(target=self._watchdog, args=(halt, current),
                             name="stockade-watch-probe", daemon=True),
        ]
        if self.events_log:
            tail = PodmanEventsLog(self.events_log)

            def emit(raw: dict) -> None:
                self.created.note(raw)   # here, not in the consumer: the hook waits for it
                inbox.put((_RAW, raw))

            threads.append(threading.Thread(
                target=tail.follow, args=(halt, emit),
                name="stockade-watch-log", daemon=True))
        for thread in threads:
            thread.start()
        known: dict[str, Workload] = {}
        last_ns: dict[str, int] = {}
        retries: list = []                      # heap of (due, seq, raw, attempt)
        seq = itertools.count()
        next_list = None                        # monotonic time of the next full listing
        try:
            while True:
                now = time.monotonic()
                due = [t for t in (next_list, retries[0][0] if retries else None) if t is not None]
                try:
                    kind, item = inbox.get(timeout=max(0.0, min(due) - now) if due else None)
                except queue.Empty:
                    kind, item = None, None
                if kind == _STOP or halt.is_set():
                    return
                if kind == _FAIL:
                    raise item
                if kind == _RAW:
                    self.health.event()
                    event = self._translate(item, known, last_ns, retries, seq, 1)
                    if event is not None:
                        yield event
                    continue
                now = time.monotonic()
                while retries and retries[0][0] <= now:
                    _, _, raw, attempt = heapq.heappop(retries)
                    self.health.retrying = len(retries)
                    event = self._translate(raw, known, last_ns, retries, seq, attempt)
                    if event is not None:
                        yield event
                if kind == _SYNC or (next_list is not None and now >= next_list):
                    try:
                        yield from self._resync(known)
                    except DiscoveryError as exc:
                        log.warning("%s: listing failed, reconnecting: %s", self.runtime_name, exc)
                        self.health.down(f"listing containers: {exc}")
                        next_list = None
                        _abort(current)
                        continue
                    next_list = time.monotonic() + self.relist_interval
                    self.health.synced()
                    self.synced.set()
        finally:
            halt.set()
            _abort(current)

    def _read_api(self, halt, inbox, current, give_up_after) -> None:
        backoff, down_since = self.BACKOFF_MIN, None
        while not halt.is_set():
            try:
                stream = self._api.events()
            except DiscoveryError as exc:
                now = time.monotonic()
                down_since = down_since or now
                self.health.down(str(exc))
                if give_up_after is not None and now - down_since >= give_up_after:
                    inbox.put((_FAIL, exc))
                    return
                log.warning("%s: %s; retrying in %.1fs", self.runtime_name, exc, backoff)
                halt.wait(backoff)
                backoff = min(backoff * 2, self.BACKOFF_MAX)
                continue
            backoff, down_since = self.BACKOFF_MIN, None
            self._last_data = time.monotonic()
            current[0] = stream
            try:
                if halt.is_set():
                    return
                # Stream first, then list (the consumer does it on _SYNC): a change
                # in between shows up in both, and the dedup makes that harmless.
                inbox.put((_SYNC, None))
                for raw in stream:
                    self._last_data = time.monotonic()
                    inbox.put((_RAW, raw))
                if not stream.aborted and not halt.is_set():
                    log.warning("%s: event stream ended, reconnecting", self.runtime_name)
                    self.health.down("the event stream ended")
            except RuntimeUnavailable as exc:
                log.warning("%s: %s", self.runtime_name, exc)
                self.health.down(str(exc))
            finally:
                current[0] = None
                stream.close()

    def _watchdog(self, halt, current) -> None:
        """Ping the API when the stream has been quiet for probe_interval; no answer
        (a hung or stopped runtime) aborts the stream so the reader reconnects."""
        while not halt.wait(min(1.0, self.probe_interval)):
            if current[0] is None or time.monotonic() - self._last_data < self.probe_interval:
                continue
            if self._ping():
                self._last_data = time.monotonic()
                continue
            why = f"no answer to /_ping within {self.PING_TIMEOUT:g}s (hung?)"
            log.warning("%s: %s; reconnecting", self.runtime_name, why)
            self.health.down(why)
            _abort(current)

    def _ping(self) -> bool:
        if not self._own_api:
            return self._api.ping()
        with DockerAPI(self.socket_path, timeout=self.PING_TIMEOUT) as api:
            return api.ping()

    @staticmethod
    def _wait_stop(stop_event, halt, inbox, current) -> None:
        # Polls halt so the thread also ends when the consumer closes the
        # generator without setting stop_event.
        while not halt.is_set():
            if stop_event.wait(0.25):
                halt.set()
                _abort(current)
                inbox.put((_STOP, None))
                return

    def _resync(self, known: dict[str, Workload]) -> Iterator[WorkloadEvent]:
        if self.events_log:
            # containers created while nobody read the events log: the OCI hook needs
            # their create record (created.py)
            for summary in self._api.list_containers(all=True):
                self.created.seed(summary)
        now = {w.id: w for w in self.snapshot()}
        for cid in sorted(set(known) - set(now)):
            yield WorkloadEvent("removed", known.pop(cid))
        for cid, workload in sorted(now.items()):
            if known.get(cid) != workload:
                known[cid] = workload
                yield WorkloadEvent("added", workload)
        if self.sync_events:
            yield WorkloadEvent("synced", None, tuple(w for _, w in sorted(now.items())))

    def _translate(self, raw: dict, known: dict[str, Workload], last_ns: dict[str, int],
                   retries: list, seq, attempt: int) -> WorkloadEvent | None:
        if raw.get("Type", raw.get("type")) not in (None, "container"):
            return None
        action = raw.get("Action") or raw.get("status") or ""
        if action not in EVENT_ACTIONS:
            return None  # exec_*, cleanup, health_status, attach, ...
        cid = (raw.get("Actor") or {}).get("ID") or raw.get("id")
        if not cid:
            return None
        ns = raw.get("timeNano")
        if isinstance(ns, int) and ns <= last_ns.get(cid, 0):
            return None  # already handled (from the other source, or a retry overtaken)
        if action in _ADD_ACTIONS or (action in _CHECK_ACTIONS and cid in known):
            try:
                workload = self.inspect(cid)
            except DiscoveryError as exc:
                self._retry(raw, retries, seq, attempt, f"inspect {cid[:12]} after {action}: {exc}")
                return None
        if isinstance(ns, int):
            last_ns[cid] = ns          # handled: the position moves on
        if action in _ADD_ACTIONS:
            if workload is None or known.get(cid) == workload:
                return None
            known[cid] = workload
            return WorkloadEvent("added", workload)
        if action in _CHECK_ACTIONS and cid in known:
            if workload is not None:
                return None
            return WorkloadEvent("removed", known.pop(cid))
        if action in _REMOVE_ACTIONS and cid in known:
            if action == "remove":
                last_ns.pop(cid, None)  # IDs are not reused; keep the table small
            return WorkloadEvent("removed", known.pop(cid))
        if action == "remove":
            last_ns.pop(cid, None)
        return None

    def _retry(self, raw: dict, retries: list, seq, attempt: int, why: str) -> None:
        self.health.error(why)
        if attempt >= RETRIES:
            log.warning("%s: %s; giving up after %d tries (the next listing finds it)",
                        self.runtime_name, why, attempt)
            return
        delay = min(RETRY_MIN * 2 ** (attempt - 1), RETRY_MAX)
        log.warning("%s: %s; trying again in %.1fs", self.runtime_name, why, delay)
        heapq.heappush(retries, (time.monotonic() + delay, next(seq), raw, attempt + 1))
        self.health.retrying = len(retries)


def _abort(current: list) -> None:
    stream = current[0]
    if stream is not None:
        stream.abort()
