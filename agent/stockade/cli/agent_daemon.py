"""``stockade agent``: run the agent in the foreground (or clean up after it, or check
and restore its state)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from ..daemon.config import AgentConfig, ConfigError, load, schema
from .common import quiet_libraries

DEFAULT_CONFIG = "/etc/stockade/agent.yaml"
EX_CONFIG = os.EX_CONFIG  # 78: the unit's RestartPreventExitStatus, systemd does not loop
REFUSED = ("The datapath keeps enforcing the last policy it was given. "
           "`stockade agent --check-state` reports the state and the generations kept "
           "before it; `stockade agent --restore-state N` puts generation N back.")


def _default_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "off"
    if isinstance(value, list):
        return ", ".join(value) or "none"
    return str(value)


def _setting_options(props: dict, defaults, prefix: str = ""):
    """One click option per key of agent.schema.json (``block__key`` for a block's keys)."""
    out = []
    for key, prop in props.items():
        name, dest = f"{prefix}{key}", f"{prefix.replace('-', '_')}{key}".replace("-", "_")
        default = getattr(defaults, key, None) if defaults is not None else None
        if prop.get("type") == "object" and "properties" in prop:
            out += _setting_options(prop["properties"], default, f"{name}__")
            continue
        flag = "--" + name.replace("__", "-").replace("_", "-")
        helptext = f"{prop.get('description', '')} [{_default_text(default)}]"
        declared = prop.get("type")
        types: list = declared if isinstance(declared, list) else [declared]
        kw: dict = {"default": None, "help": helptext}
        if "enum" in prop:
            kw["type"] = click.Choice([str(v) for v in prop["enum"]])
        elif "boolean" in types:
            flag = f"{flag}/--no-{flag[2:]}"
        elif "array" in types:
            kw.update(multiple=True, default=(), metavar="ITEM[,ITEM]",
                      help=helptext + " Repeatable; '' for none.")
        elif "integer" in types:
            kw["type"] = int
        elif "number" in types:
            kw["type"] = float
        out.append(click.option(flag, dest, **kw))
    return out


def _flag_overrides(flags: dict, props: dict) -> dict:
    """Given flags as a (nested) mapping of settings: '' is null for a nullable key and an
    empty list for a list; a list flag's values may be comma-separated."""
    out: dict = {}
    for dest, value in flags.items():
        if value is None or value == ():
            continue
        path = dest.split("__")
        prop = props
        for part in path[:-1]:
            prop = prop[part]["properties"]
        prop = prop[path[-1]]
        declared = prop.get("type")
        types: list = declared if isinstance(declared, list) else [declared]
        if "array" in types:
            value = [item.strip() for v in value for item in v.split(",") if item.strip()]
        elif value == "" and "null" in types:
            value = None
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def settings_options(f):
    for option in reversed(_setting_options(schema()["properties"], AgentConfig())):
        f = option(f)
    return f


@click.command("agent")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
              help="YAML file with agent settings (agent.schema.json); flags override it.")
@settings_options
@click.option("--cleanup", is_flag=True, help="Detach every program and remove the pins, then exit.")
@click.option("--check-state", "check_state", is_flag=True,
              help="Check the state directory and the generations kept, without starting; "
              f"exits {EX_CONFIG} if the current state would be refused.")
@click.option("--restore-state", "restore_state", type=click.IntRange(1, 3), metavar="N",
              help="Make generation N (1-3, see --check-state) current again, then exit. "
              "The agent must be stopped.")
@click.option("--check-config", "check_config", metavar="FILE",
              help=f"Check FILE (agent.yaml) against the settings schema and exit: 0 if it is "
              f"valid, {EX_CONFIG} with each wrong key, what it expects and what it got.")
def agent(config_path, cleanup, check_state, restore_state, check_config, **flags):
    """Run the Stockade agent in the foreground.

    Settings come from --config (YAML, checked against agent.schema.json) and the flags
    below, which win. A setting of the wrong type or an unknown key makes it refuse to
    start with exit status 78 and a message naming the key, what it expects and what it got.

    A damaged state file (unreadable, cut short, the wrong shape) makes it refuse to
    start: it exits 78 (EX_CONFIG) with a message naming the file and the problem, and
    the datapath keeps enforcing the last policy.

    \b
    Examples:
      stockade agent --config /etc/stockade/agent.yaml
      stockade agent --socket /run/h1/agent.sock --bpffs-dir /run/h1/bpf --state-dir /run/h1/state
      stockade agent --cleanup --bpffs-dir /sys/fs/bpf/stockade
      stockade agent --check-state
      stockade agent --restore-state 1
      stockade agent --check-config /etc/stockade/agent.yaml
      stockade agent --managed-bridges podman0,br-lab --managed-interfaces 'tap*'
    """
    if check_config:
        try:
            load(check_config, {})
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EX_CONFIG)
        click.echo(f"{check_config}: ok")
        sys.exit(0)
    try:
        cfg = load(config_path, _flag_overrides(flags, schema()["properties"]))
    except ConfigError as exc:
        click.echo(f"stockade agent: cannot start: {exc}", err=True)
        sys.exit(EX_CONFIG)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries(cfg.log_level)
    if (cleanup or not (check_state or restore_state)) and _nslock_wanted():
        from ..daemon.nslock import LockHeld, take
        try:
            _HELD.append(take())     # before any map, link or container is touched
        except LockHeld as exc:
            click.echo(f"stockade agent: cannot start: {exc}", err=True)
            sys.exit(1)
    if cleanup:
        sys.exit(run_cleanup(cfg))
    if check_state:
        sys.exit(run_check_state(cfg))
    if restore_state:
        sys.exit(run_restore_state(cfg, restore_state))
    sys.exit(run(cfg))


_HELD: list = []   # the namespace lock, held for the process's life


def _nslock_wanted() -> bool:
    from ..daemon.nslock import wanted
    return wanted()


def run_check_state(cfg: AgentConfig) -> int:
    from ..daemon.statecheck import check_state
    reports = check_state(cfg)
    click.echo(f"state directory {cfg.state_dir}")
    for r in reports:
        click.echo(f"  {r.line()}")
    if reports[0].ok:
        return 0
    good = [r.back for r in reports[1:] if r.ok]
    click.echo("The agent would refuse to start. " + (
        f"`stockade agent --restore-state {good[0]}` puts generation {good[0]} back."
        if good else "No generation kept before it checks out."), err=True)
    return EX_CONFIG


def run_restore_state(cfg: AgentConfig, back: int) -> int:
    from ..daemon.statecheck import agent_running, restore_generation
    from ..errors import StateError
    if agent_running(cfg.socket):
        click.echo(f"error: the agent answers on {cfg.socket}; stop it first (it would write "
                   "its own state over the restored one)", err=True)
        return 1
    try:
        report, number = restore_generation(cfg, back)
    except StateError as exc:
        click.echo(f"error: {exc}", err=True)
        return EX_CONFIG
    click.echo(f"generation {back} (#{report.number}) is current again, as #{number}: "
               f"{report.policies} policies, revision {report.revision}, {report.endpoints} "
               "endpoints; the generations before it are kept")
    return 0


def run_cleanup(cfg: AgentConfig) -> int:
    """Detach from every interface this agent's endpoints map knows (attached ones
    included, identified or not) and remove its pins."""
    from ..datapath.loader import cleanup_pins
    from ..errors import StockadeError
    try:
        # the pins as they are, whatever the build or sizes that made them
        n = cleanup_pins(Path(cfg.bpffs_dir))
        from ..datapath.kerneldefault import KernelDefault, table_name
        table = table_name(cfg.nft_table, cfg.bpffs_dir)
        if KernelDefault(table, [], []).remove():
            click.echo(f"removed nftables tables bridge/inet {table}")
        import shutil

        # The proxy's steering (nft table, ip rule) is per namespace: only the agent that
        # installed it removes it, never a debugging agent's cleanup.
        from ..l7.haproxy import ProxySettings
        from ..l7.host import remove_host_steering
        if ProxySettings(Path(cfg.l7_dir)).steering_marker.exists():
            remove_host_steering(cfg)
        shutil.rmtree(cfg.l7_dir, ignore_errors=True)
    except StockadeError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    click.echo(f"detached from {n} interfaces; removed pins in {cfg.bpffs_dir}")
    return 0


def run(cfg: AgentConfig) -> int:
    from ..daemon.agent import Agent
    from ..daemon.api import AgentAPI
    from ..daemon.server import APIServer
    from ..errors import StateError, StockadeError
    log = logging.getLogger("stockade")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        a = Agent(cfg)
        a.start()
        server = APIServer(AgentAPI(a), cfg.socket, group=cfg.socket_group)
        server.start()
    except StateError as exc:
        log.error("cannot start: state %s", exc)
        click.echo(f"stockade agent: cannot start: state {exc}\n{REFUSED}", err=True)
        return EX_CONFIG
    except StockadeError as exc:
        log.error("cannot start: %s", exc)
        return 1
    metrics_server = None
    if cfg.metrics_listen:
        from ..daemon.metrics import serve_metrics
        metrics_server = serve_metrics(a, cfg.metrics_listen)
    log.info("serving the API on %s", cfg.socket)
    from ..daemon.sdnotify import notify
    notify("READY=1")
    done.wait()
    log.info("stopping; the datapath keeps enforcing the last policy")
    server.stop()
    if metrics_server:
        metrics_server.shutdown()
    a.stop()
    return 0
