"""``stockade service list|apply``: inventory-defined services on this host."""
from __future__ import annotations

import click

from .agent_cmds import make_client, print_table, socket_option
from .common import emit_json, handle_errors, output_option


@click.group("service")
def service():
    """Inventory-defined services: who gets which identity by matching."""


@service.command("list")
@socket_option
@output_option
@handle_errors
def list_(socket_path, output):
    """Services, their labels and their member endpoints on this host; conflicts.

    \b
    Examples:
      stockade service list
      stockade service list -o json
    """
    data = make_client(socket_path).services()
    if output == "json":
        emit_json(data)
        return
    print_table(["SERVICE", "LABELS", "MEMBERS", "CIDRS"],
                [[s["name"], ",".join(l.split(":", 1)[1] for l in s["labels"]),
                  ",".join(s["members"]), ",".join(s["cidrs"])] for s in data["services"]])
    for c in data["conflicts"]:
        click.echo(f"conflict: endpoint {c['endpoint']} matches {', '.join(c['services'])}; "
                   f"it gets {c['chosen']}", err=True)


@service.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("--dry-run", is_flag=True, help="Show which workloads would be relabelled.")
@socket_option
@output_option
@handle_errors
def apply(file, dry_run, socket_path, output):
    """Make the agent's service definitions exactly those in FILE (a YAML mapping
    name -> {labels, members, cidrs}, as stockade_services in an inventory).

    \b
    Example:
      stockade service apply services.yaml --dry-run
    """
    from ..policy.api.loader import load_data_file
    data = load_data_file(file) or {}  # the policy files' limits: no crash, no stall
    if isinstance(data, dict) and "stockade_services" in data:
        data = data["stockade_services"]
    r = make_client(socket_path).put_services(data, dry_run=dry_run)
    if output == "json":
        emit_json(r)
        return
    verb = "would relabel" if dry_run else "relabelled"
    click.echo(f"{'changed' if r['changed'] else 'unchanged'}; {verb} {len(r['relabeled'])} endpoints")
    for c in r["relabeled"]:
        click.echo(f"  {c['endpoint']}: service {c['service'] or '-'}")
    for c in r["conflicts"]:
        click.echo(f"conflict: endpoint {c['endpoint']} matches {', '.join(c['services'])}; "
                   f"it gets {c['chosen']}", err=True)
