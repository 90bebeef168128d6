"""Stockade's kernel datapath: the only package that uses bpf() (bcc only in its compiler process).

    from stockade.datapath import Datapath, attach, detach
    dp = Datapath({"STOCKADE_PIN_DIR": "/sys/fs/bpf/stockade"})
    attach(ifindex, dp.from_endpoint_fd, dp.to_endpoint_fd)
    dp.set_endpoint(ifindex, endpoint_id=1, identity=1001, ips=["10.0.0.1"])
"""
from .attach import Attachment, attach, detach, detach_all, list_attached
from .errors import CapacityError, DatapathError
from .loader import DEFAULT_SETTINGS, Datapath, render_source
from .maps import Reason, Verdict
from .pins import LAYOUT_VERSIONS, PINNED_MAPS, pin_name

__all__ = ["Attachment", "CapacityError", "DEFAULT_SETTINGS", "Datapath", "DatapathError",
           "LAYOUT_VERSIONS", "PINNED_MAPS", "Reason", "Verdict", "attach", "detach",
           "detach_all", "list_attached", "pin_name", "render_source"]
