"""The ``stockade`` command.

Subcommands are imported when they are run (or listed): ``stockade status`` loads the
client and nothing of the policy engine, the daemon or the web UI, so it starts fast.
"""
from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """A group whose commands are ``"module:attribute"`` strings, imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, cmd_name):
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, _, attr = self.lazy[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module, __package__), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


POLICY_COMMANDS = {
    "validate": ".policy_offline:validate", "trace": ".policy_offline:trace",
    "test": ".policy_offline:test", "import": ".agent_cmds:policy_import",
    "get": ".agent_cmds:policy_get", "delete": ".agent_cmds:policy_delete",
}
TOP_COMMANDS = {
    "status": ".agent_cmds:status", "endpoint": ".agent_cmds:endpoint",
    "identity": ".agent_cmds:identity", "ipcache": ".agent_cmds:ipcache",
    "observe": ".observe:observe", "agent": ".agent_daemon:agent",
    "service": ".service_cmds:service", "webui": ".webui_cmd:webui",
}


@click.group(cls=LazyGroup, lazy=TOP_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
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


@cli.group(cls=LazyGroup, lazy=POLICY_COMMANDS)
def policy():
    """Validate, trace and test policies; import them into the agent."""


def main():
    cli(prog_name="stockade")


if __name__ == "__main__":
    main()
