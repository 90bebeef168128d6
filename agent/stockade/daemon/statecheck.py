"""What ``stockade agent --check-state`` and ``--restore-state N`` do: read every
generation of the state directory the way a starting agent would (store.load, then
restore.restore into a model that touches no kernel), without starting anything."""
from __future__ import annotations

import socket
from dataclasses import dataclass

from ..errors import StateError
from .config import AgentConfig
from .store import GENERATIONS, StateStore


@dataclass
class GenerationReport:
    back: int                 # 0: current; 1-3: before
    number: int | None        # its generation number (0: from before format 1)
    problem: str | None       # None: it would load
    policies: int = 0
    revision: int = 0
    endpoints: int = 0
    identities: int = 0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        name = "current" if self.back == 0 else f"generation {self.back}"
        number = f" (#{self.number})" if self.number else ""
        if self.problem is not None:
            return f"{name}{number}: DAMAGED: {self.problem}"
        return (f"{name}{number}: ok: {self.policies} policies, revision {self.revision}, "
                f"{self.endpoints} endpoints, {self.identities} identities")


def check_generation(cfg: AgentConfig, back: int) -> GenerationReport:
    from .agent import Agent
    from .restore import restore
    agent = Agent(cfg, read_only=True)   # a model only: never started, no datapath, no links
    try:
        gen = agent.store.load(back)
    except StateError as exc:
        return GenerationReport(back, agent.store.number_of(back) or None, str(exc))
    try:
        with agent.locked():
            restore(agent, gen)
    except StateError as exc:
        return GenerationReport(back, gen.number, str(exc))
    return GenerationReport(back, gen.number, None, policies=len(agent.engine.policies),
                            revision=agent.state.revision, endpoints=len(agent.state.endpoints),
                            identities=len(agent.alloc.numbers()))


def check_state(cfg: AgentConfig) -> list[GenerationReport]:
    """The current generation and every one kept before it."""
    store = StateStore(cfg.state_dir, create=False)
    return [check_generation(cfg, 0)] + [check_generation(cfg, n) for n in store.available()
                                         if n <= GENERATIONS]


def agent_running(socket_path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def restore_generation(cfg: AgentConfig, back: int) -> tuple[GenerationReport, int]:
    """Check generation ``back`` and make it current; (its report, the new number).
    Raises StateError when it does not check out or cannot be written."""
    report = check_generation(cfg, back)
    if not report.ok:
        raise StateError(cfg.state_dir, f"generation {back} cannot be restored: {report.problem}")
    return report, StateStore(cfg.state_dir, create=False).restore(back)
