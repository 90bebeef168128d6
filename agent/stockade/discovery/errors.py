"""Errors raised by workload discovery.

    StockadeError            (stockade.errors)
     └── DiscoveryError      anything discovery could not do
          ├── RuntimeUnavailable   the runtime's API socket is missing or not answering
          ├── RuntimeAPIError      the runtime answered, but with an error or garbage
          └── ServiceStartError    `podman system service` did not come up

Lower-layer errors (httpx, OSError, netlink) are translated into these at the
discovery boundary with ``raise ... from exc``, so callers catch one family.
"""

from __future__ import annotations

from stockade.errors import StockadeError


class DiscoveryError(StockadeError):
    """Workload discovery failed."""


class RuntimeUnavailable(DiscoveryError):
    """The container runtime's API socket does not exist or does not answer."""

    def __init__(self, socket_path: str, msg: str) -> None:
        self.socket_path = socket_path
        super().__init__(f"{socket_path}: {msg}")


class RuntimeAPIError(DiscoveryError):
    """The runtime answered a request with an error status or an unreadable body."""

    def __init__(self, what: str, msg: str, status: int | None = None) -> None:
        self.what = what
        self.status = status
        super().__init__(f"{what}: {msg}")


class ServiceStartError(DiscoveryError):
    """`podman system service` exited or did not answer /_ping in time."""
