"""Commands that talk to the running agent, through stockade.client only.

Every command takes ``--socket`` (or $STOCKADE_SOCKET) and ``-o json``, which prints
exactly the API's data. Exit 0: done; 1: the agent refused, could not be reached, or the
input is invalid; 2: usage error.
"""
from __future__ import annotations

import os
import sys

import click

from ..client import DEFAULT_SOCKET, Client
from ..errors import InvalidRequest, NotFound
from ..policy.labels import parse_pairs
from .common import emit_json, emit_yaml, handle_errors, output_option, policy_sources

get_output_option = click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]),
                                 default="table", show_default=True,
                                 help="Output format; json and yaml print the one object.")

socket_option = click.option(
    "--socket", "socket_path", default=None, metavar="PATH",
    help=f"The agent's API socket [stockade --socket, $STOCKADE_SOCKET, {DEFAULT_SOCKET}].")


def socket_for(socket_path: str | None) -> str:
    """The command's --socket, else the global one (``stockade --socket``, which also reads
    $STOCKADE_SOCKET), else the default."""
    if socket_path:
        return socket_path
    obj = click.get_current_context().find_root().obj or {}
    return obj.get("socket") or os.environ.get("STOCKADE_SOCKET") or DEFAULT_SOCKET


def make_client(socket_path: str | None) -> Client:
    """A client for ``socket_path``; an in-process test may put a ``transport`` in ctx.obj."""
    obj = click.get_current_context().find_root().obj or {}
    return Client(socket_for(socket_path), transport=obj.get("transport"))


def parse_labels(text: str, what: str = "labels") -> dict:
    """``k=v,k=v`` -> dict; empty values are allowed, empty keys are not."""
    return dict(parse_pairs(text, f"--{what}", bare=False))


def print_table(headers: list[str], rows: list[list]) -> None:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    cells = [[str(c) for c in headers]] + [["-" if c is None or c == "" else str(c) for c in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())


def _labels_text(labels) -> str:
    if isinstance(labels, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return ",".join(labels or [])


# ---------------------------------------------------------------- status


def _emitted_as_data(obj, output: str) -> bool:
    """``-o json`` / ``-o yaml``: print ``obj`` as data (True); else leave it to the table."""
    if output == "json":
        emit_json(obj)
    elif output == "yaml":
        emit_yaml(obj)
    else:
        return False
    return True

@click.command("status")
@socket_option
@output_option
@handle_errors
def status(socket_path, output):
    """Show the agent's health. Exits 1 if the agent is degraded or unreachable.

    \b
    Examples:
      stockade status
      stockade status -o json --socket /run/stockade/agent.sock
    """
    with make_client(socket_path) as c:
        h = c.health()
    if output == "json":
        emit_json(h)
    else:
        rows = [("status", h["status"]), ("version", h["version"]),
                ("uptime", f"{h['uptime_s']:.0f}s"), ("enforcement", h["enforcement"]),
                ("audit", "on" if h["audit"] else "off"),
                ("policy revision", h["policy_revision"]), ("policies", h["policies"]),
                ("endpoints", h["endpoints"]), ("identities", h["identities"]),
                ("ipcache entries", h["ipcache"])]
        if h.get("attach"):
            rows.append(("attach mode", h["attach"]["mode"]))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            click.echo(f"{k + ':':<{width + 1}} {v}")
        if h.get("unprotected_interfaces"):
            click.echo(f"{'unprotected:':<{width + 1}} {', '.join(h['unprotected_interfaces'])}")
        for d in (h.get("attach") or {}).get("degraded") or []:
            click.echo(f"attachment repaired: {d['interface']} {d['what']} (since {d['since']})")
        for problem in h.get("policy_problems") or []:
            click.echo(f"refused stored policy: {problem}")
        for mismatch in h.get("binding_mismatches") or []:
            click.echo(f"not bound: {mismatch}")
        l7 = h.get("l7_proxy") or {}
        if l7.get("wanted"):
            state = f"running (pid {l7.get('pid')})" if l7.get("running") else "NOT RUNNING (its ports are closed)"
            line = f"l7 proxy: {state}, {l7.get('l7_ports', 0)} ports, {l7.get('restarts', 0)} restarts"
            rl = l7.get("request_log")
            if rl:
                line += f"; request log: {rl['received']} lines, {rl['garbled']} garbled"
                if rl.get("dropped"):
                    line += f", {rl['dropped']} DROPPED by the proxy (requests with no flow record)"
            click.echo(line)
            if l7.get("last_error"):
                click.echo(f"  last error: {l7['last_error']}")
            for problem in l7.get("problems") or []:
                click.echo(f"  {problem}")
        for src in h.get("sources") or []:
            state = ("connected" if src["connected"] else
                     f"waiting: {src['waiting']}" if src.get("waiting") else "NOT CONNECTED")
            line = (f"source {src['name']} ({src['where']}): {state}"
                    f"{' since ' + src['since'] if src.get('since') else ''}, "
                    f"last event {src.get('last_event') or 'none'}, "
                    f"last listing {src.get('last_sync') or 'none'}, {src['errors']} errors")
            if src.get("retrying"):
                line += f", {src['retrying']} inspects to retry"
            click.echo(line)
            if src.get("last_error"):
                click.echo(f"  last error ({src.get('last_error_at')}): {src['last_error']}")
        kv = h.get("kvstore")
        if kv:
            age = kv.get("last_event_age_s")
            click.echo(f"kvstore: {kv['state']}, {kv['endpoints_reachable']} etcd endpoints "
                       f"reachable, revision {kv['revision']}, {kv['remote_entries']} remote "
                       f"entries, {kv['refused_entries']} refused, last answer "
                       f"{'never' if age is None else f'{age}s ago'}")
            for r in kv.get("refusals") or []:
                click.echo(f"  refused {r['key']}: {r['reason']}")
            for conflict in kv.get("conflicts") or []:
                click.echo(f"  conflict {conflict['prefix']}: {conflict['reason']}")
            if kv.get("last_error"):
                click.echo(f"  last error: {kv['last_error']}")
        for e in h.get("errors") or []:
            click.echo(f"error: {e}")
    if h["status"] != "ok":
        sys.exit(1)


# ---------------------------------------------------------------- endpoints

@click.group("endpoint")
def endpoint():
    """List, add and remove endpoints (the workloads the agent protects)."""


@endpoint.command("list")
@socket_option
@output_option
@handle_errors
def endpoint_list(socket_path, output):
    """List endpoints with their identity, state and enforcement.

    DROPPED counts the labels its source gave that the endpoint does not get (another
    source's, reserved, invalid, or its image's); -o json lists them in dropped_labels.

    \b
    Examples:
      stockade endpoint list
      stockade endpoint list -o json
    """
    with make_client(socket_path) as c:
        eps = c.endpoints()
    if output == "json":
        return emit_json(eps)

    def enf(e):
        d = e.get("enforcement") or {}
        return "/".join(("deny" if d.get(x, {}).get("default_deny") else
                         "on" if d.get(x, {}).get("enforced") else "off") for x in ("ingress", "egress"))

    print_table(["NAME", "ID", "INTERFACE", "IPS", "IDENTITY", "STATE", "IN/OUT", "AUDIT",
                 "SOURCE", "DROPPED", "LABELS"],
                [[e["name"], e["id"], e["interface"], ",".join(e["ips"]), e["identity"],
                  e["state"], enf(e), "yes" if e["audit"] else "no", e["source"],
                  len(e.get("dropped_labels") or []) or None, _labels_text(e["labels"])]
                 for e in eps])


@endpoint.command("get")
@click.argument("name")
@socket_option
@get_output_option
@handle_errors
def endpoint_get(name, socket_path, output):
    """Show endpoint NAME (exit 1 if there is none).

    \b
    Examples:
      stockade endpoint get web1
      stockade endpoint get web1 -o json | jq .identity
      stockade endpoint get web1 -o yaml
    """
    with make_client(socket_path) as c:
        eps = [e for e in c.endpoints() if e["name"] == name]
    if not eps:
        raise NotFound(f"no endpoint named {name}", "name")
    ep = eps[0]
    if _emitted_as_data(ep, output):
        return
    rows = [("name", ep["name"]), ("id", ep["id"]), ("interface", ep["interface"]),
            ("ips", ", ".join(ep["ips"])), ("identity", ep["identity"]), ("state", ep["state"]),
            ("source", ep["source"]), ("audit", "yes" if ep["audit"] else "no"),
            ("labels", _labels_text(ep["labels"]))]
    for d in ep.get("dropped_labels") or []:
        rows.append(("dropped label", f"{d['label']}: {d['reason']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k + ':':<{width + 1}} {'-' if v in (None, '') else v}")


@endpoint.command("add")
@click.option("--name", required=True, help="Endpoint name, unique on this host.")
@click.option("--interface", metavar="IF", help="Host-side interface (veth, tap); or give --mac.")
@click.option("--mac", metavar="MAC", help="A VM's guest MAC; without --interface its tap is found "
              "from it (host-side MAC fe:xx:... or equal).")
@click.option("--ip", "ips", required=True, metavar="A[,B]", help="Workload addresses, comma-separated.")
@click.option("--labels", default="", metavar="k=v,k=v", help="Labels that give the identity.")
@click.option("--audit", is_flag=True, default=None, help="Log what policy would drop, drop nothing.")
@socket_option
@output_option
@handle_errors
def endpoint_add(name, interface, mac, ips, labels, audit, socket_path, output):
    """Add a static endpoint. Adding the same spec again changes nothing.

    \b
    Examples:
      stockade endpoint add --name web1 --interface veth-web1 --ip 10.0.0.5 --labels app=web,tier=front
      stockade endpoint add --name vm1 --interface tap0 --ip 10.0.1.2,fd00::2 --labels app=db --audit
      stockade endpoint add --name vm2 --mac 52:54:00:12:34:56 --ip 10.0.1.3 --labels app=db
    """
    ip_list = [s.strip() for s in ips.split(",") if s.strip()]
    with make_client(socket_path) as c:
        ep = c.add_endpoint(name=name, interface=interface, ips=ip_list,
                            labels=parse_labels(labels), audit=audit, mac=mac)
    if output == "json":
        return emit_json(ep)
    click.echo(f"endpoint {ep['name']} (id {ep['id']}) on {ep['interface']}: identity "
               f"{ep['identity']}, {ep['state']}")
    for d in ep.get("dropped_labels") or []:
        click.echo(f"warning: label {d['label']} dropped: {d['reason']}", err=True)


@endpoint.command("remove")
@click.argument("name")
@socket_option
@output_option
@handle_errors
def endpoint_remove(name, socket_path, output):
    """Remove endpoint NAME; its traffic is no longer policed.

    \b
    Example:
      stockade endpoint remove web1
    """
    with make_client(socket_path) as c:
        c.remove_endpoint(name)
    if output == "json":
        return emit_json({"removed": name})
    click.echo(f"endpoint {name} removed")


# ---------------------------------------------------------------- identities

@click.group("identity")
def identity():
    """Show the identities the agent has allocated."""


@identity.command("list")
@socket_option
@output_option
@handle_errors
def identity_list(socket_path, output):
    """List identities: number, kind, labels and the local endpoints that have them.

    \b
    Examples:
      stockade identity list
      stockade identity list -o json
    """
    with make_client(socket_path) as c:
        ids = c.identities()
    if output == "json":
        return emit_json(ids)
    print_table(["ID", "KIND", "LOCAL", "ENDPOINTS", "LABELS"],
                [[i["id"], i["kind"], "yes" if i.get("local") else "no",
                  ",".join(i.get("endpoints") or []),
                  i.get("prefix") or _labels_text(i["labels"])] for i in ids])


@identity.command("get")
@click.argument("number", type=int, metavar="ID")
@socket_option
@get_output_option
@handle_errors
def identity_get(number, socket_path, output):
    """Show identity ID (exit 1 if there is none).

    \b
    Examples:
      stockade identity get 256
      stockade identity get 2 -o json
    """
    with make_client(socket_path) as c:
        ids = [i for i in c.identities() if i["id"] == number]
    if not ids:
        raise NotFound(f"no identity {number}", "id")
    ident = ids[0]
    if _emitted_as_data(ident, output):
        return
    rows = [("id", ident["id"]), ("kind", ident["kind"]), ("local", "yes" if ident.get("local") else "no"),
            ("endpoints", ", ".join(ident.get("endpoints") or [])),
            ("labels", ident.get("prefix") or _labels_text(ident["labels"]))]
    for k, v in rows:
        click.echo(f"{k + ':':<10} {'-' if v in (None, '') else v}")


# ---------------------------------------------------------------- ipcache

@click.group("ipcache")
def ipcache():
    """List and edit the IP-to-identity cache (remote workloads on other hosts)."""


@ipcache.command("list")
@socket_option
@output_option
@handle_errors
def ipcache_list(socket_path, output):
    """List ipcache entries.

    \b
    Examples:
      stockade ipcache list
      stockade ipcache list -o json
    """
    with make_client(socket_path) as c:
        entries = c.ipcache()
    if output == "json":
        return emit_json(entries)
    print_table(["PREFIX", "IDENTITY", "SOURCE", "HOST", "LABELS"],
                [[e["prefix"], e["identity"], e["source"], e.get("host"),
                  _labels_text(e["labels"])] for e in entries])


@ipcache.command("add")
@click.argument("prefix")
@click.option("--labels", required=True, metavar="k=v,k=v", help="Labels of the remote workload.")
@click.option("--host", default=None, help="The host the workload runs on.")
@socket_option
@output_option
@handle_errors
def ipcache_add(prefix, labels, host, socket_path, output):
    """Map PREFIX (an address or CIDR) of a remote workload to the identity of its labels.

    \b
    Examples:
      stockade ipcache add 10.1.2.3 --labels app=db --host db1.example.net
      stockade ipcache add 10.1.2.0/24 --labels app=batch,team=data --host batch-host
    """
    parsed = parse_labels(labels)
    if not parsed:
        raise InvalidRequest("--labels: give at least one key=value", "labels")
    with make_client(socket_path) as c:
        e = c.add_ipcache(prefix, parsed, host)
    if output == "json":
        return emit_json(e)
    click.echo(f"{e['prefix']} -> identity {e['identity']}")


@ipcache.command("remove")
@click.argument("prefix")
@socket_option
@output_option
@handle_errors
def ipcache_remove(prefix, socket_path, output):
    """Remove the ipcache entry for PREFIX.

    \b
    Example:
      stockade ipcache remove 10.1.2.0/24
    """
    with make_client(socket_path) as c:
        c.remove_ipcache(prefix)
    if output == "json":
        return emit_json({"removed": prefix})
    click.echo(f"ipcache entry {prefix} removed")


# ---------------------------------------------------------------- policies

def print_result(result: dict) -> None:
    """A PolicyResult as people read it: what changed, then rule and entry counts."""
    d = result["diff"]
    if result["dry_run"]:
        head = "dry run: would change" if result["changed"] else "dry run: no change"
    else:
        head = (f"applied, policy revision {result['revision']}" if result["changed"]
                else f"no change, policy revision {result['revision']}")
    click.echo(head)
    for mark, key in (("+", "added"), ("-", "removed"), ("~", "changed")):
        for name in d.get(key, []):
            click.echo(f"  {mark} {name}")
    rules, entries = d.get("rules", {}), d.get("entries", {})
    click.echo(f"rules: +{len(rules.get('added', []))} -{len(rules.get('removed', []))}; "
               f"map entries: +{entries.get('added', 0)} -{entries.get('removed', 0)}")
    for line in rules.get("added", []):
        click.echo(f"  + {line}")
    for line in rules.get("removed", []):
        click.echo(f"  - {line}")


@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--replace-all", is_flag=True,
              help="Make the live set exactly FILES: policies not in them are removed.")
@socket_option
@output_option
@handle_errors
def policy_import(files, dry_run, replace_all, socket_path, output):
    """Send policy FILES to the agent, validated as one set: any error and nothing changes.
    A directory gives its .yaml, .yml and .json files; `-` reads standard input.

    \b
    Examples:
      stockade policy import --dry-run policies/*.yaml
      stockade policy import --replace-all policies/
      stockade policy get db -o yaml | stockade policy import --dry-run -
    """
    files = policy_sources(files)
    with make_client(socket_path) as c:
        result = c.put_policies(files, replace_all=replace_all, dry_run=dry_run)
    if output == "json":
        return emit_json(result)
    print_result(result)


@click.command("get")
@click.argument("names", nargs=-1)
@click.option("--namespace", default=None, help="Only policies in this namespace.")
@socket_option
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table",
              show_default=True, help="Output format; yaml gives documents you can import again.")
@handle_errors
def policy_get(names, namespace, socket_path, output):
    """Show the live policies (all, or those named NAMES). A NAME that matches no policy
    exits 1; with one NAME, -o json prints that policy's object (a list otherwise).

    \b
    Examples:
      stockade policy get
      stockade policy get web-policy -o yaml > web.yaml
      stockade policy get web-policy -o json | jq .rules
      stockade policy get -o json
    """
    with make_client(socket_path) as c:
        pols = c.policies()
    pols = [p for p in pols if (not names or p["name"] in names)
            and (namespace is None or p.get("namespace") == namespace)]
    missing = [n for n in names if n not in {p["name"] for p in pols}]
    if missing:
        where = f" in namespace {namespace}" if namespace else ""
        raise NotFound(f"no policy named {', '.join(missing)}{where}", "name")
    if output == "json":
        return emit_json(pols[0] if len(names) == 1 and len(pols) == 1 else pols)
    if output == "yaml":
        import yaml

        click.echo(yaml.safe_dump_all([p["document"] for p in pols], sort_keys=False), nl=False)
        return
    print_table(["KIND", "NAMESPACE", "NAME", "RULES", "SOURCE", "DESCRIPTION"],
                [[p["kind"], p.get("namespace"), p["name"], p["rules"], p["source"],
                  _one_line(p.get("description") or "") + (" [REFUSED BY THIS VERSION]" if p.get("problems") else "")]
                 for p in pols])


def _one_line(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


@click.command("delete")
@click.argument("name", required=False)
@click.option("--namespace", default=None, help="Namespace of NAME.")
@click.option("--kind", default=None, type=click.Choice(["CiliumNetworkPolicy",
                                                         "CiliumClusterwideNetworkPolicy"]),
              help="Kind of NAME, where two kinds share the name.")
@click.option("--all", "all_", is_flag=True, help="Delete every policy.")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@socket_option
@output_option
@handle_errors
def policy_delete(name, namespace, kind, all_, dry_run, socket_path, output):
    """Delete policy NAME, or every policy with --all.

    \b
    Examples:
      stockade policy delete web-policy --namespace shop
      stockade policy delete --all --dry-run
    """
    if bool(name) == all_:
        raise click.UsageError("give either NAME or --all")
    if all_ and (namespace or kind):
        raise click.UsageError("--namespace and --kind go with NAME, not --all")
    with make_client(socket_path) as c:
        result = (c.delete_all_policies(dry_run=dry_run) if all_ else
                  c.delete_policy(name, namespace, kind, dry_run=dry_run))
    if output == "json":
        return emit_json(result)
    print_result(result)


POLICY_COMMANDS = (policy_import, policy_get, policy_delete)
TOP_COMMANDS = (status, endpoint, identity, ipcache)
