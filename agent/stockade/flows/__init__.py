"""Flow visibility: datapath events decoded into compact records, kept in a ring.

    ring = FlowRing(65535)
    dec = Decoder(ring, resolver)          # resolver: what the agent knows (decode.py)
    dec.decode_into_ring(raw_events)       # a batch of raw struct flow_event bytes
    FlowFilter.parse({"verdict": ["DROPPED"]}).select(ring)   # rows, oldest first
    ring.to_dict(row)                      # the API shape

The agent side (polling thread, API, flow log) is stockade.daemon.flowsource.
"""
from .connections import connections, flow_port
from .decode import EVENT, Decoder, Resolver
from .filters import KEYS as FILTER_KEYS
from .filters import LIST_KEYS as FILTER_LIST_KEYS
from .filters import FlowFilter, parse_time
from .flowlog import FlowLog
from .record import RECORD_SIZE, connection_key
from .ring import FlowRing

__all__ = ["EVENT", "FILTER_KEYS", "FILTER_LIST_KEYS", "Decoder", "FlowFilter", "FlowLog",
           "FlowRing", "RECORD_SIZE", "Resolver", "connection_key", "connections", "flow_port",
           "parse_time"]
