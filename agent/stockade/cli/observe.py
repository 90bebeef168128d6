"""``stockade observe``: recent and live flows, filtered like ``hubble observe``."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..flows.filters import CRITERIA, LIST_KEYS
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
    l7 = flow.get("l7")
    if l7:
        from ..flows.hubble import printable
        http = {k: printable(v) for k, v in l7["http"].items() if k != "headers"}
        proto = f"{http['protocol'] or 'HTTP'} {l7['type'].lower()}"
        if l7["type"] == "REQUEST":
            proto += f" {http['method']} {http['url']}"
        else:
            proto += f" {http['code']} {l7['latency_ns'] / 1e6:.1f}ms {http['method']} {http['url']}"
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


FILTERS = LIST_KEYS


class ObserveCommand(click.Command):
    """``--not`` negates the filter flag that follows it (``--not --verdict FORWARDED``),
    as in hubble observe: it is read as that filter's hidden ``--not-...`` twin."""

    def parse_args(self, ctx, args):
        flags = {"--" + k.replace("_", "-") for k in FILTERS}
        out, i = [], 0
        while i < len(args):
            arg = args[i]
            if arg == "--not":
                nxt = args[i + 1] if i + 1 < len(args) else ""
                name = nxt.split("=", 1)[0]
                if name not in flags:
                    raise click.UsageError(f"--not must be followed by a filter flag "
                                           f"({', '.join(sorted(flags))}), not {nxt!r}", ctx)
                out.append("--not-" + nxt[2:])
                i += 2
                continue
            if arg == "--":
                out.extend(args[i:])
                break
            out.append(arg)
            i += 1
        return super().parse_args(ctx, out)


def _filter_options(f):
    """A flag per flow filter (stockade.flows.filters.CRITERIA) and its hidden ``--not-`` twin."""
    for c in reversed(CRITERIA):
        kw: dict[str, Any] = {"help": c.help}
        if c.choices:
            kw["type"] = click.Choice(c.choices, case_sensitive=False)
        elif c.number:
            kw["type"] = int
        else:
            kw["metavar"] = c.metavar
        flag = "--" + c.key.replace("_", "-")
        f = click.option(f"--not-{flag[2:]}", f"not_{c.key}", multiple=True, hidden=True,
                         **{k: v for k, v in kw.items() if k != "help"})(f)
        f = click.option(flag, c.key, multiple=True, **kw)(f)
    return f


@click.command("observe", cls=ObserveCommand)
@socket_option
@_filter_options
@click.option("--not", "negate", is_flag=True, help="Negate the filter flag that follows: "
              "--not --verdict FORWARDED shows every flow but the forwarded ones.")
@click.option("--since", metavar="TIME|DURATION", help="RFC 3339 time or 30s, 5m, 1h ago.")
@click.option("--until", metavar="TIME|DURATION", help="Only flows at or before this time.")
@click.option("--last", type=click.IntRange(min=1), metavar="N", help="Only the N newest.")
@click.option("--first", type=click.IntRange(min=1), metavar="N", help="Only the N oldest.")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing new flows (after the history --since or --last asks for).")
@click.option("-o", "--output", type=click.Choice(["table", "compact", "json", "jsonpb"]),
              default="table", show_default=True,
              help="table for people; compact: one short line per flow, as hubble prints it; "
              "json: one object per line (the API's Flow); jsonpb: Hubble's flow JSON, one "
              '{"flow": ..., "node_name": ..., "time": ...} per line.')
@click.option("--color", "colour", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="Colour the verdict (auto: only on a terminal).")
@handle_errors
def observe(socket_path, output, colour, follow, negate, **filters):
    """Show flows: who talked to whom, with identities, labels and the verdict.

    A flag given twice matches either value (OR); different flags must all hold (AND);
    --not before a flag excludes what that flag would select. Without --last, --first,
    --since or --follow, the 20 newest matching flows are shown. With --follow, the
    flows --since or --last selects are printed first, then new ones as they come.

    \b
    Examples:
      stockade observe --last 20
      stockade observe --verdict DROPPED --to-label app=db --port 5432
      stockade observe --from-label app=web --from-label app=api -f
      stockade observe --since 5m --protocol tcp -o json
      stockade observe --not --verdict FORWARDED --to-endpoint db1 -o compact
      stockade observe --since 10m -f --to-port 5432
      stockade observe --since 2026-05-02T10:00:00Z --until 2026-05-02T10:05:00Z --first 100
      stockade observe -o jsonpb --last 100 | jq -r '.flow.IP.source'
      stockade observe --type l7 --http-method GET --http-path '^/api/' --http-status 4+
    """
    criteria = {k: (list(v) if isinstance(v, tuple) else v) for k, v in filters.items()}
    for key in ("verdict", "not_verdict"):
        criteria[key] = [v.upper() for v in criteria.get(key) or []]
    for key in ("type", "not_type"):
        criteria[key] = [v.lower() for v in criteria.get(key) or []]
    if follow and (criteria.get("until") or criteria.get("first")):
        raise click.UsageError("--until and --first select recorded flows; they cannot be "
                               "used with --follow")
    if not follow and criteria.get("last") is None and criteria.get("first") is None \
            and not criteria.get("since"):
        criteria["last"] = DEFAULT_LAST
    use_colour = colour == "always" or (colour == "auto" and sys.stdout.isatty())
    from ..flows import hubble

    def show(flow):
        if output == "json":
            click.echo(json.dumps(flow, separators=(",", ":")))
        elif output == "jsonpb":
            click.echo(json.dumps(hubble.to_jsonpb(flow), separators=(",", ":")))
        elif output == "compact":
            click.echo(hubble.compact(flow))
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
    if output in ("table", "compact") and sys.stderr.isatty():
        lost = sum((res.get("events_lost") or {}).values())
        click.echo(f"{res['count']} flows, {res['connections']} connections"
                   + (f", {lost} events lost (rate limit or full buffer)" if lost else ""),
                   err=True)
