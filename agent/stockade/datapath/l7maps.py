"""The L7 steering maps (bpf/lib/l7.h), written as a whole desired state (mixed into
``Datapath``): which local addresses and TCP ports the proxy enforces, and per
endpoint interface where a steered packet enters the host's IP stack (the device's
ifindex and MAC)."""
from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, AbstractSet, Any, Mapping

from . import maps as m
from .errors import DatapathError

L7Port = tuple[str, int, int]  # (address, TCP port, m.L7_SERVER or m.L7_CLIENT)


def _port_key(addr: str, port: int, kind: int) -> m.L7PortKey:
    ip = ipaddress.ip_address(addr)
    k = m.L7PortKey(family=ip.version, kind=kind, port=socket.htons(port))
    k.addr[:len(ip.packed)] = ip.packed
    return k


class L7Maps:
    """Needs MapWriter's ``_update``, ``_delete`` and ``_items``."""

    if TYPE_CHECKING:
        def _items(self, name: str, key_type: Any, value_type: Any) -> list: ...
        def _update(self, name: str, key: Any, value: Any) -> None: ...
        def _delete(self, name: str, key: Any) -> bool: ...
        def config_flags(self) -> int: ...
        def _write_config(self, flags: int) -> None: ...

    def l7_ports(self) -> dict[L7Port, int]:
        out = {}
        for k, v in self._items("l7_ports", m.L7PortKey, m.L7PortValue):
            raw = bytes(k.addr[:4] if k.family == 4 else k.addr)
            out[(str(ipaddress.ip_address(raw)), socket.ntohs(k.port), k.kind)] = v.identity
        return out

    def l7_hosts(self) -> dict[int, tuple[int, bytes]]:
        return {k.value: (v.ifindex, bytes(v.mac)) for k, v in
                self._items("l7_host", m.ct.c_uint32, m.L7Host)}

    def sync_l7(self, ports: Mapping[L7Port, int], hosts: Mapping[int, tuple[int, bytes]]) -> None:
        """Make both maps hold exactly ``ports`` and ``hosts`` (endpoint ifindex ->
        (device ifindex, MAC)). Hosts are added first and removed last: a port is never
        steered from an interface without a way in (that drops: closed, not open).
        A kind's "none" config bit (the programs skip its lookups) is cleared before its
        first entry is written and set only after its last one is removed: a port is
        never in the map while the programs skip looking."""
        have_hosts = self.l7_hosts()
        for ifindex, (dev, mac) in hosts.items():
            if have_hosts.get(ifindex) != (dev, mac):
                v = m.L7Host(ifindex=dev)
                v.mac[:] = mac
                self._update("l7_host", m.ct.c_uint32(ifindex), v)
        have = self.l7_ports()
        kinds = {kind for _, _, kind in ports}
        self._l7_bits(clear=kinds)
        for key, ident in ports.items():
            if have.get(key) != ident:
                self._update("l7_ports", _port_key(*key), m.L7PortValue(ident))
        for key in have.keys() - ports.keys():
            self._delete("l7_ports", _port_key(*key))
        self._l7_bits(set_={m.L7_SERVER, m.L7_CLIENT} - kinds)
        for ifindex in have_hosts.keys() - hosts.keys():
            self._delete("l7_host", m.ct.c_uint32(ifindex))

    def align_l7_bits(self) -> None:
        """Each kind's "none" bit as the l7_ports entries now in the map say (for the
        agent's start, before it attaches or steers anything: pinned maps keep whatever
        bits a crash, a hand or another build left). A kind with an entry is looked up,
        one without may be skipped; when the entries cannot be read, both are looked up."""
        bit = {m.L7_SERVER: m.CFG_F_L7_NO_SERVERS, m.L7_CLIENT: m.CFG_F_L7_NO_CLIENTS}
        try:
            kinds = {kind for _, _, kind in self.l7_ports()} & bit.keys()
        except DatapathError:
            self._l7_bits(clear=bit.keys())
            raise
        self._l7_bits(set_=bit.keys() - kinds, clear=kinds)

    def _l7_bits(self, set_: AbstractSet[int] = frozenset(), clear: AbstractSet[int] = frozenset()) -> None:
        bit = {m.L7_SERVER: m.CFG_F_L7_NO_SERVERS, m.L7_CLIENT: m.CFG_F_L7_NO_CLIENTS}
        have = self.config_flags()
        flags = have
        for kind in set_:
            flags |= bit[kind]
        for kind in clear:
            flags &= ~bit[kind]
        if flags != have:
            self._write_config(flags)
