"""One client for the Docker-compatible REST API on a unix socket.

The same code talks to Docker's socket and to Podman's compat socket
(`podman system service`); only the socket path and the runtime name differ.
Requests use API version prefix /v1.41, which both understand.

Every httpx error is translated here: a socket that is missing, refuses or
drops the connection becomes RuntimeUnavailable; an error status or a body
that is not JSON becomes RuntimeAPIError.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from .errors import RuntimeAPIError, RuntimeUnavailable
from .netns import netns_inode
from .veth import find_host_veth
from .workload import Workload

API_VERSION = "v1.41"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
IMAGE_CACHE_MAX = 256  # images whose labels are kept (an image ID never changes its labels)

# Container actions the watcher acts on. "init" is Podman's (network and PID
# exist, user process not yet exec'd): reacting on it gives policy a head
# start over "start". They are filtered client-side: Podman 4.3 matches an
# `event` filter against its internal names ("died", not "die"), so a
# server-side filter silently drops die events there.
EVENT_ACTIONS = ("init", "start", "restart", "die", "stop", "kill", "remove")


class DockerAPI:
    """Docker-compatible REST client bound to one unix socket.

    transport: replace the unix-socket transport (tests use httpx.MockTransport).
    timeout: seconds for connect and for each non-streaming request.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float = 5.0,
        api_version: str = API_VERSION,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._prefix = f"/{api_version}"
        self._timeout = timeout
        self._transport_override = transport
        self._client = self._new_client(httpx.Timeout(timeout))
        self._image_labels: dict[str, dict[str, str]] = {}  # image ID -> Config.Labels

    def _new_client(self, timeout: httpx.Timeout) -> httpx.Client:
        transport = self._transport_override or httpx.HTTPTransport(uds=self.socket_path)
        return httpx.Client(transport=transport, base_url="http://docker", timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DockerAPI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ---------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            raise RuntimeUnavailable(self.socket_path, f"{what}: {exc or type(exc).__name__}") from exc

    def _get_json(self, path: str, params: dict | None = None, *, versioned: bool = True) -> Any:
        url = (self._prefix + path) if versioned else path
        with self._errors(f"GET {url}"):
            resp = self._client.get(url, params=params)
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            raise RuntimeAPIError(f"GET {url}", _error_message(resp), resp.status_code)
        try:
            return resp.json()
        except ValueError as exc:
            raise RuntimeAPIError(f"GET {url}", "body is not JSON") from exc

    def ping(self) -> bool:
        """True when the socket answers GET /_ping with 200."""
        try:
            resp = self._client.get("/_ping", timeout=min(self._timeout, 2.0))
        except httpx.TransportError:
            return False
        return resp.status_code == 200

    def list_containers(self, *, all: bool = False) -> list[dict]:
        """Summaries of running containers (GET /containers/json); ``all``: of every
        container, created and exited ones too."""
        return self._get_json("/containers/json", {"all": "true"} if all else None) or []

    def inspect(self, container: str) -> dict | None:
        """GET /containers/{id}/json; None when the container does not exist."""
        return self._get_json(f"/containers/{container}/json")

    def image_labels(self, image_id: str | None) -> dict[str, str] | None:
        """Config.Labels of GET /images/{id}/json: {} for a container without an image
        (``--rootfs``), None when the image is gone or ``image_id`` is not an image ID.

        Cached by ID: an image ID is the hash of its config, labels included, so a cached
        entry never goes stale. Only IDs ("sha256:<hex>"), never names, which move.
        """
        if not image_id:
            return {}
        if _HEX64.match(image_id):
            image_id = "sha256:" + image_id
        if not image_id.startswith("sha256:") or not _HEX64.match(image_id[7:]):
            return None
        cached = self._image_labels.get(image_id)
        if cached is not None:
            return dict(cached)
        data = self._get_json(f"/images/{image_id}/json")
        if not isinstance(data, dict):
            return None
        labels = dict((data.get("Config") or {}).get("Labels") or {})
        if len(self._image_labels) >= IMAGE_CACHE_MAX:
            self._image_labels.pop(next(iter(self._image_labels)))
        self._image_labels[image_id] = labels
        return dict(labels)

    def image_labels_by_name(self, ref: str) -> dict[str, str] | None:
        """Config.Labels of the image ``ref`` names now ({} for no image, None when there
        is no such image). For the OCI hook, which knows a container's image by the name
        its create event gave: a name may move, so the container's inspect (the events
        path, right after the start) has the last word."""
        if not ref:
            return {}
        data = self._get_json(f"/images/{quote(ref, safe='/:@')}/json")
        if not isinstance(data, dict):
            return None
        return dict((data.get("Config") or {}).get("Labels") or {})

    def events(self, since: int | None = None) -> EventStream:
        """Open GET /events?filters={"type":["container"]}; see EventStream.

        since: replay events from this UNIX time on (the server's clock).
        """
        params: dict[str, str] = {"filters": json.dumps({"type": ["container"]})}
        if since is not None:
            params["since"] = str(since)
        return EventStream(self, self._prefix + "/events", params)


class EventStream:
    """An open /events response, iterated as decoded JSON objects.

    Opening it (the constructor) raises RuntimeUnavailable when the socket does
    not answer. Iteration ends when the server closes the stream or abort() is
    called from another thread; it raises RuntimeUnavailable when the
    connection breaks. The stream has its own connection, so inspect() calls
    can run while it is open.
    """

    def __init__(self, api: DockerAPI, url: str, params: dict[str, str]) -> None:
        self._api = api
        self._aborted = False
        # The headers must come within the timeout (a stopped runtime accepts the
        # connection and never answers); events may then be hours apart: no read
        # timeout for the body (the watcher's watchdog pings a quiet runtime instead).
        self._client = api._new_client(httpx.Timeout(api._timeout))
        request = self._client.build_request("GET", url, params=params)
        with api._errors(f"GET {url}"):
            self._resp = self._client.send(request, stream=True)
        timeouts = request.extensions.get("timeout")
        if isinstance(timeouts, dict):
            timeouts["read"] = None   # read by the transport when the body's first chunk is
        if self._resp.status_code >= 400:
            self._resp.read()
            msg = _error_message(self._resp)
            self.close()
            raise RuntimeAPIError(f"GET {url}", msg, self._resp.status_code)

    def __iter__(self) -> Iterator[dict]:
        decoder = json.JSONDecoder()
        buf = ""
        try:
            for chunk in self._resp.iter_text():
                buf += chunk
                while True:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    try:
                        obj, end = decoder.raw_decode(buf)
                    except ValueError:
                        break  # incomplete object: wait for more bytes
                    buf = buf[end:]
                    if isinstance(obj, dict):
                        yield obj
        except (httpx.TransportError, httpx.StreamError) as exc:
            if not self._aborted:
                raise RuntimeUnavailable(self._api.socket_path, f"event stream broke: {exc}") from exc

    def abort(self) -> None:
        """Wake a reader blocked in __iter__ (thread-safe); iteration then ends."""
        self._aborted = True
        stream = self._resp.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def aborted(self) -> bool:
        return self._aborted

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._resp.close()
        self._client.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("message"):
            return f"{resp.status_code} {body['message']}"
    except ValueError:
        pass
    return f"{resp.status_code} {resp.text[:200]}"


def _ips(settings: dict) -> tuple[str, ...]:
    found: list[str] = []
    sources = [settings] + list((settings.get("Networks") or {}).values())
    for src in sources:
        for key in ("IPAddress", "GlobalIPv6Address"):
            ip = (src or {}).get(key)
            if ip and ip not in found:
                found.append(ip)
    return tuple(found)


def _mac(settings: dict) -> str | None:
    if settings.get("MacAddress"):
        return settings["MacAddress"]
    for net in (settings.get("Networks") or {}).values():
        if net and net.get("MacAddress"):
            return net["MacAddress"]
    return None


def workload_from_inspect(runtime: str, data: dict, *, resolve_veth: bool = True,
                          image_labels: dict[str, str] | None = None) -> Workload:
    """Build a Workload from a /containers/{id}/json document.

    resolve_veth: look up the host-side veth (netlink, needs CAP_SYS_ADMIN);
    when False, host_ifname and host_ifindex stay None.
    image_labels: the labels of the container's image (DockerAPI.image_labels of the
    document's top-level "Image", its ID); None: unknown.
    """
    config = data.get("Config") or {}
    state = data.get("State") or {}
    settings = data.get("NetworkSettings") or {}
    pid = state.get("Pid") or None
    mac = _mac(settings)
    veth = None
    if resolve_veth and (pid or settings.get("SandboxKey")):
        veth = find_host_veth(pid, netns_path=settings.get("SandboxKey") or None, mac=mac)
    netns_path = settings.get("SandboxKey") or (f"/proc/{pid}/ns/net" if pid else None)
    netns_ino = netns_inode(netns_path) if netns_path and resolve_veth else None
    return Workload(
        runtime=runtime,
        id=data["Id"],
        name=(data.get("Name") or "").lstrip("/"),
        image=config.get("Image") or data.get("Image") or "",
        labels=dict(config.get("Labels") or {}),
        image_labels=image_labels,
        ips=_ips(settings),
        host_ifname=veth.ifname if veth else None,
        host_ifindex=veth.ifindex if veth else None,
        mac=(veth.mac if veth and veth.mac else mac),
        pid=pid,
        netns_path=netns_path if netns_ino else None,
        netns_inode=netns_ino,
    )
