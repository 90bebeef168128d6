"""Owned attachments: the datapath's two programs on an interface, in tcx or tc mode.

tcx (kernels 6.6 and later): one BPF link per hook, created first in the hook's order
and pinned in the agent's bpffs directory as ``links/<ifindex>-<hook>``. The pin keeps
the link across agent restarts (a restarted agent swaps the program with
BPF_LINK_UPDATE, no packet sees the hook empty); ``tc filter del`` and ``tc qdisc del
... clsact`` do not touch it; it goes when its interface goes.

tc (older kernels): a clsact bpf filter (attach.py), which anyone with CAP_NET_ADMIN can
remove: the agent's guard (daemon/attachguard.py) puts it back.

``check`` says what is wrong with an interface's attachment (missing, another program in
our place, a foreign program running ahead of ours); ``attach`` repairs all of it: in
tcx our link is created again in first place when anything runs ahead of it.
Moving between modes is safe both ways: the new mode's attachment is made before the
other mode's is removed.
"""
from __future__ import annotations

import errno
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from . import tcx
from .attach import PRIO, hook_filters, list_attached
from .attach import attach as tc_attach
from .attach import detach as tc_detach
from .errors import DatapathError, InterfaceGone

MODES = ("auto", "tcx", "tc")
HOOKS = ("ingress", "egress")      # ingress: from_endpoint, egress: to_endpoint


def resolve_mode(mode: str) -> str:
    """"auto" is tcx where the kernel has it, else tc; "tcx" on a kernel without it is an error."""
    if mode not in MODES:
        raise DatapathError("attach_mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "tc":
        return "tc"
    if tcx.supported():
        return "tcx"
    if mode == "tcx":
        raise DatapathError("attach_mode", "tcx needs Linux 6.6 or later; use tc or auto")
    return "tc"


@dataclass(frozen=True)
class Problem:
    ifindex: int
    hook: str
    what: str        # "missing", "replaced by ...", "foreign program ahead: ..."


def _locked(method):
    """One operation at a time: the guard thread checks while an API thread detaches, and
    a link fd one closes must never be used (or, reused by the kernel, detached) by the other."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Attachments:
    """Attach, check and detach the programs ``prog_fds`` ({hook: fd}) on interfaces."""

    def __init__(self, pin_dir: Path, mode: str, prog_fds: dict[str, int],
                 names: dict[str, str], load_copies=None):
        """``load_copies()``: {hook: fd} of a second load of the same programs. tcx runs a
        program once per hook, so putting ours back in first place while the old link is
        still there (no moment without it) needs the other copy."""
        self.mode = resolve_mode(mode)
        self.links_dir = Path(pin_dir) / "links"
        self.prog_fds = dict(prog_fds)
        self.names = dict(names)
        self.prog_ids = {hook: tcx.prog_info(fd).id for hook, fd in prog_fds.items()}
        self._load_copies = load_copies
        self._copies: dict[str, int] = {}
        self._copy_ids: dict[str, int] = {}
        self._links: dict[tuple[int, str], int] = {}   # open link fds (tcx)
        self._lock = threading.RLock()

    def _ours(self, hook: str, prog_id: int) -> bool:
        return prog_id in (self.prog_ids[hook], self._copy_ids.get(hook))

    @_locked
    def prepare(self) -> None:
        """Load the second copy now (the verifier takes a while), not at the first repair."""
        if self.mode == "tcx" and not self._copies and self._load_copies is not None:
            self._copies = dict(self._load_copies())
            self._copy_ids = {h: tcx.prog_info(fd).id for h, fd in self._copies.items()}

    def _other_copy(self, hook: str, running: int) -> int:
        """The fd of our program for ``hook`` that is not ``running`` (a prog id)."""
        if running != self.prog_ids[hook]:
            return self.prog_fds[hook]
        self.prepare()
        if not self._copies:
            raise DatapathError("tcx", "no second copy of the programs to move ours first")
        return self._copies[hook]

    # ------------------------------------------------------------------ tcx links
    def _pin(self, ifindex: int, hook: str) -> Path:
        return self.links_dir / f"{ifindex}-{hook}"

    def _open_link(self, ifindex: int, hook: str) -> int | None:
        """Our live link on (ifindex, hook), from the open fds or the pin; a pin of a
        link whose interface went (defunct) is removed."""
        key = (ifindex, hook)
        fd = self._links.get(key)
        path = self._pin(ifindex, hook)
        if fd is None and path.exists():
            try:
                fd = tcx.obj_get(str(path))
            except OSError as exc:
                raise DatapathError(str(path), f"cannot open link pin: {exc.strerror}") from exc
        if fd is None:
            return None
        info = tcx.link_info(fd)
        if info.ifindex != ifindex or info.hook != hook:
            self._forget(ifindex, hook, fd)
            return None
        self._links[key] = fd
        return fd

    def _forget(self, ifindex: int, hook: str, fd: int | None) -> None:
        self._links.pop((ifindex, hook), None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self._pin(ifindex, hook))
        except FileNotFoundError:
            pass

    def _new_link(self, ifindex: int, hook: str, prog_fd: int) -> int:
        """A link of ours in first place, pinned (replacing the previous pin, if any)."""
        self.links_dir.mkdir(parents=True, exist_ok=True)
        fd = tcx.link_create(prog_fd, ifindex, hook, first=True)
        tmp = self.links_dir / f"new-{ifindex}-{hook}"     # bpffs refuses dots in names
        try:
            if tmp.exists():
                tmp.unlink()
            tcx.obj_pin(fd, str(tmp))
            os.rename(tmp, self._pin(ifindex, hook))
        except OSError:
            os.close(fd)
            raise
        return fd

    def _attach_tcx(self, ifindex: int) -> None:
        for hook in HOOKS:
            fd = self._open_link(ifindex, hook)
            ahead = self._tcx_ahead(ifindex, hook, fd)
            if fd is None:
                self._links[(ifindex, hook)] = self._new_link(ifindex, hook, self.prog_fds[hook])
            elif ahead:
                # ours first again, then the old link goes: never a moment without it
                running = tcx.link_info(fd).prog_id
                new = self._new_link(ifindex, hook, self._other_copy(hook, running))
                try:
                    tcx.link_detach(fd)
                except OSError:
                    pass
                os.close(fd)
                self._links[(ifindex, hook)] = new
            elif not self._ours(hook, tcx.link_info(fd).prog_id):
                tcx.link_update(fd, self.prog_fds[hook])     # a previous run's program
        if any(a.ifindex == ifindex for a in list_attached(ifindex)):
            tc_detach(ifindex)          # a tc-mode filter of a previous run

    def _tcx_ahead(self, ifindex: int, hook: str, fd: int | None) -> list[tcx.Entry]:
        """Programs tcx runs before our link on (ifindex, hook)."""
        if fd is None:
            return []
        link_id = tcx.link_info(fd).id
        out: list[tcx.Entry] = []
        for e in tcx.query(ifindex, hook):
            if e.link_id == link_id:
                return out
            out.append(e)
        return out

    # ------------------------------------------------------------------ interface
    @_locked
    def attach(self, ifindex: int) -> None:
        """Our programs on ``ifindex``, first; replaces a previous run's in one step."""
        try:
            if self.mode == "tcx":
                self._attach_tcx(ifindex)
            else:
                tc_attach(ifindex, self.prog_fds["ingress"], self.prog_fds["egress"],
                          self.names["ingress"], self.names["egress"])
                self._detach_tcx(ifindex)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise InterfaceGone(ifindex) from exc
            raise DatapathError(f"ifindex {ifindex}", f"cannot attach programs ({self.mode}): "
                                f"{exc.strerror or exc}") from exc

    def _detach_tcx(self, ifindex: int) -> None:
        for hook in HOOKS:
            fd = self._open_link(ifindex, hook)
            if fd is not None:
                try:
                    tcx.link_detach(fd)
                except OSError:
                    pass
            self._forget(ifindex, hook, fd)

    @_locked
    def detach(self, ifindex: int) -> None:
        """Our programs off ``ifindex``, in both modes."""
        try:
            self._detach_tcx(ifindex)
        except OSError as exc:
            raise DatapathError(f"ifindex {ifindex}", f"cannot detach: {exc.strerror}") from exc
        tc_detach(ifindex)

    @_locked
    def check(self, ifindex: int) -> list[Problem]:
        """What keeps our programs from judging every packet of ``ifindex`` ([]: nothing)."""
        out = []
        try:
            for hook in HOOKS:
                what = self._check_tcx(ifindex, hook) if self.mode == "tcx" else \
                    self._check_tc(ifindex, hook)
                if what:
                    out.append(Problem(ifindex, hook, what))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return []
            raise DatapathError(f"ifindex {ifindex}", f"cannot check: {exc.strerror}") from exc
        return out

    def _check_tcx(self, ifindex: int, hook: str) -> str | None:
        fd = self._open_link(ifindex, hook)
        if fd is None:
            return "missing"
        info = tcx.link_info(fd)
        if not self._ours(hook, info.prog_id):
            return f"replaced by {_describe(info.prog_id)}"
        ahead = self._tcx_ahead(ifindex, hook, fd)
        if ahead:
            return "foreign program ahead: " + ", ".join(_describe(e.prog_id) for e in ahead)
        return None

    def _check_tc(self, ifindex: int, hook: str) -> str | None:
        filters = hook_filters(ifindex, hook)
        ours = [f for f in filters if f.prio == PRIO]
        if not ours:
            return "missing"
        if not self._ours(hook, ours[0].prog_id):
            return f"replaced by {_describe(ours[0].prog_id)}"
        return None

    @_locked
    def owned(self) -> list[int]:
        """Interfaces with a pinned link of ours (tcx, this pin directory)."""
        out: set[int] = set()
        try:
            names = os.listdir(self.links_dir)
        except FileNotFoundError:
            return []
        for fn in names:
            idx, _, hook = fn.partition("-")
            if idx.isdigit() and hook in HOOKS:
                out.add(int(idx))
        return sorted(out)

    @_locked
    def programs(self, ifindex: int) -> dict[str, list[str]]:
        """{hook: names of the programs run, in order} (tcx first, then tc), for status."""
        out: dict[str, list[str]] = {}
        for hook in HOOKS:
            names = []
            if self.mode == "tcx":
                names += [_describe(e.prog_id) for e in tcx.query(ifindex, hook)]
            names += [f"tc:{_describe(f.prog_id)}" for f in hook_filters(ifindex, hook)]
            out[hook] = names
        return out

    @_locked
    def close(self) -> None:
        """Close the link fds (the pins keep the links)."""
        for fd in [*self._links.values(), *self._copies.values()]:
            os.close(fd)
        self._links.clear()
        self._copies.clear()

    @_locked
    def remove_pins(self) -> None:
        """Detach every link this pin directory owns and remove its pins."""
        for idx in self.owned():
            self._detach_tcx(idx)
        for fn in os.listdir(self.links_dir) if self.links_dir.exists() else ():
            os.unlink(self.links_dir / fn)
        try:
            self.links_dir.rmdir()
        except OSError:
            pass


def _describe(prog_id: int) -> str:
    try:
        info = tcx.prog_info_by_id(prog_id)
    except OSError:
        info = None
    return f"{info.name} (id {prog_id})" if info else f"program id {prog_id}"


def programs_on(ifindex: int) -> dict[str, list[str]]:
    """{hook: names of the BPF programs run on ``ifindex``, tcx ones then tc ones}: what a
    test or an operator sees, whatever the mode."""
    out: dict[str, list[str]] = {}
    for hook in HOOKS:
        names = []
        if tcx.supported():
            for e in tcx.query(ifindex, hook):
                info = tcx.prog_info_by_id(e.prog_id)
                names.append(info.name if info else "?")
        names += [f.name for f in hook_filters(ifindex, hook)]
        out[hook] = names
    return out
