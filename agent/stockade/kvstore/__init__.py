"""The fleet store's client: etcd v3 over gRPC (aetcd's bindings), and what the client
does not handle by itself: endpoint failover and backoff (client.EtcdClient), a prefix
listed in pages then watched, listed again on compaction or a broken stream
(mirror.Mirror), and this host's keys under leases kept alive, granted again when lost
(publisher.Publisher). The agent's use of it is daemon/fleet.py."""
from .client import KV, EtcdClient, Event, prefix_end
from .errors import Compacted, KvstoreError, LeaseNotFound, PermissionDenied, Unavailable
from .mirror import Mirror
from .publisher import Publisher

__all__ = ["KV", "Compacted", "EtcdClient", "Event", "KvstoreError", "LeaseNotFound", "Mirror",
           "PermissionDenied", "Publisher", "Unavailable", "prefix_end"]
