"""What the fleet store's client raises."""
from __future__ import annotations

from ..errors import StockadeError


class KvstoreError(StockadeError):
    """etcd refused or failed a request."""


class Unavailable(KvstoreError):
    """No endpoint answered (down, partitioned, no quorum, stream cut)."""


class Compacted(KvstoreError):
    """The revision asked for is compacted: list again."""

    def __init__(self, message: str, compact_revision: int):
        super().__init__(message)
        self.compact_revision = compact_revision


class LeaseNotFound(KvstoreError):
    """etcd no longer has the lease (it expired): grant a new one, put its keys again."""


class PermissionDenied(KvstoreError):
    """etcd's RBAC refused the request."""
