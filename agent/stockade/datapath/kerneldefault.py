"""The kernel-side default: an nftables table of Stockade's own that drops frames of
managed interfaces that do not run Stockade's programs (yet).

While the agent is down or restarting, a new container's veth or a new VM's tap has no
programs: without this table it would run unfiltered. The table matches

- frames entering from or leaving to a port of a managed bridge (bridge family:
  ``meta ibrname``/``obrname``, where the kernel has nft bridge meta; without it, e.g.
  Debian 12's cloud kernel, frames of any bridge's ports named like
  ``kernel_default_bridge_ports``, ``veth*`` by default), and bridge ports
  and interfaces whose names match ``managed_interfaces`` or ``kernel_default_interfaces``
  (bridge family, and inet family for interfaces that are not bridged), in the forward,
  input (traffic to the host itself) and output hooks, both directions;

and drops them unless the interface is in the set ``protected``: the ifindexes the agent
attached its programs to. (Stockade's programs judge what such an interface sends and
receives; the set only says they are there.) No packet mark is used: tc egress, where
``to_endpoint`` runs, comes after every netfilter hook, so a mark could not vouch for
the direction toward the workload; the set needs no bit of the mark (Podman's 0x2000,
libvirt's, kube-proxy's stay untouched). Ifindexes are not reused while the host runs,
so a stale element never opens a new interface.

The table stays in the kernel when the agent stops or is killed (the set with it), a
restarted agent replaces it in one nft transaction keeping the elements, then brings
the set in line with what it attached; ``stockade agent --cleanup`` deletes it.
Under ``unknown_endpoint: forward`` the rules count instead of dropping.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess

from .errors import DatapathError

FAMILIES = ("bridge", "inet")


def _nft(script: str | None = None, *args: str) -> str:
    nft = shutil.which("nft")
    if nft is None:
        raise DatapathError("nft", "nft (the nftables package) is not installed")
    argv = [nft, *args] if script is None else [nft, "-f", "-"]
    r = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise DatapathError("nft", (r.stderr.strip() or r.stdout.strip())[:500])
    return r.stdout


def bridge_meta_supported(table: str) -> bool:
    """Whether this kernel has nft bridge meta (``ibrname``; CONFIG_NFT_BRIDGE_META)."""
    probe = f"{table}_probe"
    try:
        _nft(f"table bridge {probe} {{ chain c {{ meta ibrname \"x\" counter; }}; }}\n"
             f"delete table bridge {probe}\n")
        return True
    except DatapathError:
        return False


def table_name(configured: str | None, bpffs_dir: str) -> str:
    """The table's name: the setting, else "stockade" for the default pin directory and
    a name derived from any other (agents with pins of their own get tables of their own)."""
    if configured:
        return configured
    if bpffs_dir.rstrip("/") == "/sys/fs/bpf/stockade":
        return "stockade"
    import hashlib
    return "stockade_" + hashlib.sha256(bpffs_dir.encode()).hexdigest()[:10]


def _q(pattern: str) -> str:
    return '"' + pattern.replace('"', "") + '"'


class KernelDefault:
    def __init__(self, table: str, bridges, interfaces, drop: bool = True, bridge_ports=()):
        if not table.replace("_", "").isalnum():
            raise DatapathError("nft_table", f"{table!r}: letters, digits and _ only")
        self.table = table
        self.bridges = list(bridges)
        self.interfaces = list(interfaces)
        self.bridge_ports = list(bridge_ports)
        self.verdict = "drop" if drop else ""
        self.bridge_meta: bool | None = None

    # ------------------------------------------------------------------ rules
    def _chains(self, family: str) -> str:
        ins, outs = [], []
        if family == "bridge":
            if self.bridge_meta:
                ins += [f"meta ibrname {_q(b)}" for b in self.bridges]
                outs += [f"meta obrname {_q(b)}" for b in self.bridges]
            elif self.bridges:
                # no bridge meta: ports of any bridge by name (the bridge family sees
                # only bridged frames, so a routed veth is not touched)
                ins += [f"iifname {_q(p)}" for p in self.bridge_ports]
                outs += [f"oifname {_q(p)}" for p in self.bridge_ports]
        # inet: bridged frames (br_netfilter) show the bridge as iif/oif; the bridge
        # family judged their ports already
        notbr = ("", "") if family == "bridge" else (' meta iifkind != "bridge"',
                                                     ' meta oifkind != "bridge"')
        ins += [f"iifname {_q(p)}{notbr[0]}" for p in self.interfaces]
        outs += [f"oifname {_q(p)}{notbr[1]}" for p in self.interfaces]
        v = self.verdict

        def rules(matches, side):
            return "".join(f"    {m} {side} != @protected counter {v}\n" for m in matches)
        hooks = {"forward": rules(ins, "iif") + rules(outs, "oif"),
                 "input": rules(ins, "iif"), "output": rules(outs, "oif")}
        return "".join(f"  chain {h} {{\n    type filter hook {h} priority -300; policy accept;\n"
                       f"{body}  }}\n" for h, body in hooks.items())

    def script(self, protected) -> str:
        elems = ", ".join(str(i) for i in sorted(set(protected)))
        out = []
        for fam in FAMILIES:
            elements = f" elements = {{ {elems} }};" if elems else ""
            out.append(f"table {fam} {self.table}\ndelete table {fam} {self.table}\n"
                       f"table {fam} {self.table} {{\n"
                       f"  set protected {{ type iface_index;{elements} }}\n"
                       f"{self._chains(fam)}}}\n")
        return "".join(out)

    # ------------------------------------------------------------------ kernel
    def current(self) -> set[int]:
        """The set's elements as the kernel has them (empty without the table)."""
        try:
            data = json.loads(_nft(None, "-j", "list", "set", "bridge", self.table, "protected"))
        except (DatapathError, ValueError):
            return set()
        out = set()
        for item in data.get("nftables", []):
            for e in (item.get("set") or {}).get("elem", []):
                if isinstance(e, int) or (isinstance(e, str) and e.isdigit()):
                    out.add(int(e))
                elif isinstance(e, str):          # nft names the ifindexes that exist
                    try:
                        out.add(socket.if_nametoindex(e))
                    except OSError:
                        pass
        return out

    def install(self, keep=()) -> None:
        """Replace both tables in one transaction, the set keeping what it had (plus
        ``keep``): a restart never drops a protected interface."""
        if self.bridge_meta is None:
            self.bridge_meta = bridge_meta_supported(self.table)
        _nft(self.script(self.current() | set(keep)))

    def protect(self, ifindexes) -> None:
        self._elements("add", ifindexes)

    def unprotect(self, ifindexes) -> None:
        self._elements("delete", ifindexes)

    def sync(self, ifindexes) -> None:
        """The set is exactly ``ifindexes``."""
        want, have = set(ifindexes), self.current()
        if want - have:
            self.protect(want - have)
        if have - want:
            self.unprotect(have - want)

    def _elements(self, op: str, ifindexes) -> None:
        idx = sorted(set(ifindexes))
        if not idx:
            return
        elems = ", ".join(map(str, idx))
        script = "".join(f"{op} element {fam} {self.table} protected {{ {elems} }}\n"
                         for fam in FAMILIES)
        try:
            _nft(script)
        except DatapathError:
            if op != "delete":
                raise
            for i in idx:              # some were gone already: one by one
                for fam in FAMILIES:
                    try:
                        _nft(f"delete element {fam} {self.table} protected {{ {i} }}\n")
                    except DatapathError:
                        pass

    def remove(self) -> bool:
        """Delete both tables; False when there were none."""
        found = False
        for fam in FAMILIES:
            try:
                _nft(f"delete table {fam} {self.table}\n")
                found = True
            except DatapathError:
                pass
        return found
