"""The ``stockade`` command."""
from __future__ import annotations

import click

from . import agent_cmds, agent_daemon, observe, policy_offline, service_cmds, webui_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stockade")
@click.option("--socket", "socket_path", envvar="STOCKADE_SOCKET", metavar="PATH", default=None,
              help="The agent's API socket for every command [$STOCKADE_SOCKET, "
              "/run/stockade/agent.sock]; a command's own --socket wins.")
@click.pass_context
def cli(ctx, socket_path):
    """Stockade: identity-based network policy for hosts, enforced with eBPF.

    Shell completion: `eval "$(_STOCKADE_COMPLETE=bash_source stockade)"` (zsh_source,
    fish_source for those shells); the stockade_agent role installs it for bash.

    \b
    Examples:
      stockade status
      stockade --socket /run/h1/agent.sock endpoint list
      stockade observe --verdict DROPPED -f
      stockade policy validate policies/
    """
    ctx.ensure_object(dict)
    if socket_path:
        ctx.obj["socket"] = socket_path


@cli.group()
def policy():
    """Validate, trace and test policies; import them into the agent."""


for cmd in (policy_offline.validate, policy_offline.trace, policy_offline.test,
            *agent_cmds.POLICY_COMMANDS):
    policy.add_command(cmd)

for cmd in (*agent_cmds.TOP_COMMANDS, observe.observe, agent_daemon.agent, service_cmds.service):
    cli.add_command(cmd)
cli.add_command(webui_cmd.webui)


def main():
    cli(prog_name="stockade")


if __name__ == "__main__":
    main()
