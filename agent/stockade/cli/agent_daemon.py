"""``stockade agent``: run the agent in the foreground (or clean up after it, or check
and restore its state)."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from ..daemon.config import AgentConfig, load

DEFAULT_CONFIG = "/etc/stockade/agent.yaml"
EX_CONFIG = os.EX_CONFIG  # 78: the unit's RestartPreventExitStatus, systemd does not loop
REFUSED = ("The datapath keeps enforcing the last policy it was given. "
           "`stockade agent --check-state` reports the state and the generations kept "
           "before it; `stockade agent --restore-state N` puts generation N back.")


def _opt(name, **kw):
    return click.option(f"--{name.replace('_', '-')}", name, default=None, **kw)


@click.command("agent")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
              help="YAML file with agent settings; flags override it.")
@_opt("socket", help="API socket path [/run/stockade/agent.sock].")
@_opt("socket_group", help="Group that may read the API socket [stockade].")
@_opt("bpffs_dir", help="Directory for pinned maps [/sys/fs/bpf/stockade].")
@_opt("state_dir", help="Persistent state [/var/lib/stockade].")
@_opt("enforcement", type=click.Choice(["default", "always", "never"]))
@click.option("--audit/--no-audit", "audit", default=None, help="Forward would-be drops as AUDIT.")
@_opt("unknown_endpoint", type=click.Choice(["drop", "forward"]),
      help="Packets of interfaces whose workload is not identified yet [drop].")
@_opt("podman_socket", help="Podman API socket ('' to disable) [/run/podman/podman.sock].")
@click.option("--podman-start-service/--no-podman-start-service", "podman_start_service", default=None,
              help="Start `podman system service` when its socket does not answer.")
@_opt("podman_events_log", help="Podman events.log to follow for fast start detection.")
@_opt("docker_socket", help="Docker API socket ('' to disable) [/var/run/docker.sock].")
@click.option("--trust-image-labels/--no-trust-image-labels", "trust_image_labels", default=None,
              help="Give containers the labels their image sets (its author then chooses "
              "their identity) [off: such labels are dropped and reported].")
@_opt("libvirt_uri", help="Discover VMs through libvirt, e.g. qemu:///system ('' to disable) [off].")
@click.option("--libvirt-trust-guest-agent/--no-libvirt-trust-guest-agent", "libvirt_trust_guest_agent",
              default=None, help="Take VM addresses from the guest agent when metadata and DHCP "
              "leases give none [off].")
@_opt("host_name", help="This host's name in the fleet [hostname].")
@_opt("flow_buffer_size", type=int, help="Recent flows kept [65535].")
@_opt("flow_log_path", help="Also write flows as JSON lines to this file ('' to disable) [off].")
@_opt("flow_log_max_bytes", type=int, help="Rotate the flow log at this size, 0: never [100 MiB].")
@_opt("flow_log_backups", type=int, help="Rotated flow logs kept [5].")
@_opt("flow_events_rate", type=int, help="New-connection flow events per second per CPU [20000].")
@_opt("flow_events_burst", type=int, help="Burst of new-connection flow events per CPU [2000].")
@_opt("drop_events_rate", type=int, help="Drop events per second per CPU [5000].")
@_opt("drop_events_burst", type=int, help="Burst of drop events per CPU [1000].")
@_opt("l7_haproxy", help="HAProxy binary of the L7 proxy [/usr/sbin/haproxy].")
@_opt("l7_user", help="User the L7 proxy runs as [haproxy].")
@_opt("l7_run_dir", help="The L7 proxy's configuration, maps and sockets [/run/stockade/l7].")
@_opt("l7_proxy_port", type=int, help="The L7 proxy's transparent listener port [15001].")
@_opt("l7_mark", type=int, help="Mark of packets steered to the L7 proxy [0x5D170000].")
@_opt("l7_route_table", type=int, help="Route table of steered packets [2317].")
@_opt("l7_rule_priority", type=int, help="ip rule preference of steered packets [2317].")
@_opt("l7_nft_table", help="nft table (family inet) of L7 steering [stockade_l7].")
@_opt("l7_slots", type=int, help="HTTP rules per rule set before the proxy restarts [8].")
@_opt("l7_match_limit", type=int, help="PCRE2 match limit of each HTTP pattern [100000].")
@_opt("ct_gc_interval", type=float, help="Seconds between conntrack collections [30].")
@_opt("runtime_probe_interval", type=float,
      help="Seconds of a quiet runtime event stream before the runtime is pinged [5].")
@_opt("runtime_relist_interval", type=float,
      help="Seconds between full listings of a runtime's containers [60].")
@_opt("metrics_listen", help="Also serve /metrics on HOST:PORT (e.g. 127.0.0.1:9962).")
@_opt("policy_map_size", type=int)
@_opt("endpoints_map_size", type=int)
@_opt("ipcache_map_size", type=int)
@_opt("ct_map_size", type=int)
@_opt("log_level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--cleanup", is_flag=True, help="Detach every program and remove the pins, then exit.")
@click.option("--check-state", "check_state", is_flag=True,
              help="Check the state directory and the generations kept, without starting; "
              f"exits {EX_CONFIG} if the current state would be refused.")
@click.option("--restore-state", "restore_state", type=click.IntRange(1, 3), metavar="N",
              help="Make generation N (1-3, see --check-state) current again, then exit. "
              "The agent must be stopped.")
def agent(config_path, cleanup, check_state, restore_state, **flags):
    """Run the Stockade agent in the foreground.

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
    """
    for k in ("podman_socket", "docker_socket", "podman_events_log", "metrics_listen",
              "flow_log_path", "libvirt_uri"):
        if flags.get(k) == "":
            flags[k] = None
            flags[f"_{k}_off"] = True
    off = {k[1:-4] for k in list(flags) if k.startswith("_") and flags.pop(k)}
    from ..errors import StockadeError
    try:
        cfg = load(config_path, {k: v for k, v in flags.items() if v is not None})
        for k in off:
            setattr(cfg, k, None)
    except StockadeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cleanup:
        sys.exit(run_cleanup(cfg))
    if check_state:
        sys.exit(run_check_state(cfg))
    if restore_state:
        sys.exit(run_restore_state(cfg, restore_state))
    sys.exit(run(cfg))


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
    from ..datapath import Datapath
    from ..errors import StockadeError
    try:
        dp = Datapath(cfg.datapath_settings())
        n = len(dp.endpoint_ifindexes())
        dp.cleanup()
        dp.close()
        from ..l7.host import remove_host_steering
        remove_host_steering(cfg)
        import shutil
        shutil.rmtree(cfg.l7_run_dir, ignore_errors=True)
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
    done.wait()
    log.info("stopping; the datapath keeps enforcing the last policy")
    server.stop()
    if metrics_server:
        metrics_server.shutdown()
    a.stop()
    return 0
