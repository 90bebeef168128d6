"""``stockade observe``: recent and live flows, filtered like ``hubble observe``."""
from __future__ import annotations

import json
import sys

import click

from .agent_cmds import make_client, socket_option
from .common import handle_errors

DEFAULT_LAST = 20
VERDICT_COLOURS = {"FORWARDED": "green", "DROPPED": "red", "AUDIT": "yellow"}


def _peer(flow: dict, side: str) -> str:
    p = flow[side]
    ip = flow["ip"][side]
    l4 = flow["l4"]
    port = l4.get(f"{side}_port")
    addr = f"[{ip}]" if ":" in ip else ip
    where = f"{addr}:{port}" if port else addr
    ep = p.get("endpoint") or {}
    name = ep.get("name")
    labels = ",".join(l.split(":", 1)[-1] for l in p.get("labels", [])
                      if not l.startswith("reserved:") or len(p["labels"]) == 1)
    who = name or labels or "-"
    if name and labels:
        who = f"{name} ({labels})"
    return f"{where} {who} [{p['identity']}]"


def format_line(flow: dict, colour: bool) -> str:
    """One line for people: time, source -> destination, protocol, verdict, reason, policy."""
    l4 = flow["l4"]
    proto = l4["protocol"].upper()
    if l4.get("tcp_flags"):
        proto += " " + ",".join(l4["tcp_flags"])
    if "icmp_type" in l4:
        proto += f" type {l4['icmp_type']}"
    verdict = flow["verdict"]
    if colour:
        verdict = click.style(verdict, fg=VERDICT_COLOURS.get(verdict), bold=True)
    extra = []
    if flow.get("drop_reason"):
        extra.append(flow["drop_reason"])
    if flow.get("policy"):
        extra.append("policy " + ",".join(flow["policy"]))
    arrow = "->"
    return (f"{flow['time'][:23].replace('T', ' ')}  {_peer(flow, 'source')} {arrow} "
            f"{_peer(flow, 'destination')}  {flow['direction']:<7} {proto}  {verdict}"
            + (f"  ({'; '.join(extra)})" if extra else ""))


@click.command("observe")
@socket_option
@click.option("--verdict", multiple=True, type=click.Choice(["FORWARDED", "DROPPED", "AUDIT"],
              case_sensitive=False), help="FORWARDED, DROPPED or AUDIT.")
@click.option("--from-label", multiple=True, metavar="K=V[,K=V]", help="Source labels.")
@click.option("--to-label", multiple=True, metavar="K=V[,K=V]", help="Destination labels.")
@click.option("--label", multiple=True, metavar="K=V[,K=V]", help="Labels of either side.")
@click.option("--port", multiple=True, type=int, help="Source or destination port.")
@click.option("--protocol", multiple=True, help="tcp, udp, icmp, icmpv6, sctp.")
@click.option("--identity", multiple=True, type=int, help="Identity of either side.")
@click.option("--ip", multiple=True, metavar="IP|CIDR", help="Address of either side.")
@click.option("--from-ip", multiple=True, metavar="IP|CIDR", help="Source address.")
@click.option("--to-ip", multiple=True, metavar="IP|CIDR", help="Destination address.")
@click.option("--direction", multiple=True, type=click.Choice(["ingress", "egress"]))
@click.option("--drop-reason", multiple=True, help="policy_denied, spoofed, ...")
@click.option("--since", metavar="TIME|DURATION", help="RFC 3339 time or 30s, 5m, 1h ago.")
@click.option("--last", type=click.IntRange(min=1), metavar="N", help="Only the N newest.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new flows.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="table for people; json: one object per line.")
@click.option("--color", "colour", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="Colour the verdict (auto: only on a terminal).")
@handle_errors
def observe(socket_path, output, colour, follow, **filters):
    """Show flows: who talked to whom, with identities, labels and the verdict.

    A flag given twice matches either value (OR); different flags must all hold (AND).
    Without --last, --since or --follow, the 20 newest matching flows are shown.

    \b
    Examples:
      stockade observe --last 20
      stockade observe --verdict DROPPED --to-label app=db --port 5432
      stockade observe --from-label app=web --from-label app=api -f
      stockade observe --since 5m --protocol tcp -o json
    """
    criteria = {k: (list(v) if isinstance(v, tuple) else v) for k, v in filters.items()}
    criteria["verdict"] = [v.upper() for v in criteria.get("verdict") or []]
    if not follow and criteria.get("last") is None and not criteria.get("since"):
        criteria["last"] = DEFAULT_LAST
    use_colour = colour == "always" or (colour == "auto" and sys.stdout.isatty())

    def show(flow):
        if output == "json":
            click.echo(json.dumps(flow, separators=(",", ":")))
        else:
            click.echo(format_line(flow, use_colour), color=use_colour)

    with make_client(socket_path) as c:
        if follow:
            try:
                for flow in c.follow_flows(**criteria):
                    show(flow)
            except KeyboardInterrupt:
                pass
            return
        res = c.flows(**criteria)
    for flow in res["flows"]:
        show(flow)
    if output != "json" and sys.stderr.isatty():
        lost = sum((res.get("events_lost") or {}).values())
        click.echo(f"{res['count']} flows, {res['connections']} connections"
                   + (f", {lost} events lost (rate limit or full buffer)" if lost else ""),
                   err=True)
