"""``stockade webui``: serve the policy-review web UI with waitress."""
from __future__ import annotations

import grp
import os
import pwd
import sys

import click

from ..client import DEFAULT_SOCKET
from .agent_cmds import socket_for

DEFAULT_BIND = "127.0.0.1:8470"
DEFAULT_TOKEN_FILE = "/etc/stockade/webui.token"


def split_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{bind!r} is not HOST:PORT", param_hint="--bind")
    return host.strip("[]") or "127.0.0.1", int(port)


def drop_privileges(user: str) -> None:
    """From root to ``user``, with its primary group and the ``stockade`` group (read
    access to the agent socket). Irreversible."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise click.BadParameter(f"no user named {user!r}", param_hint="--user") from None
    groups = {pw.pw_gid}
    try:
        groups.add(grp.getgrnam("stockade").gr_gid)
    except KeyError:
        click.echo("webui: warning: no 'stockade' group; the agent socket may be unreadable",
                   err=True)
    os.setgroups(sorted(groups))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise click.ClickException("could not drop root privileges")


@click.command("webui")
@click.option("--bind", default=DEFAULT_BIND, show_default=True, metavar="HOST:PORT",
              help="Address to listen on. Anything but loopback needs --trusted-host and a "
                   "TLS-terminating proxy in front.")
@click.option("--token-file", default=DEFAULT_TOKEN_FILE, show_default=True,
              type=click.Path(dir_okay=False),
              help="File holding the login token (not readable by others).")
@click.option("--init-token", is_flag=True,
              help="Create --token-file with a random token if it does not exist "
                   "(mode 0600), print its path and exit.")
@click.option("--socket", "sockets", multiple=True, metavar="[NAME=]PATH",
              help="Agent socket to read; repeat for several hosts (e.g. SSH-forwarded "
                   f"sockets). Default: stockade --socket, $STOCKADE_SOCKET or {DEFAULT_SOCKET}.")
@click.option("--trusted-host", "trusted_hosts", multiple=True, metavar="NAME",
              help="Host name the browser uses for the UI, besides localhost/127.0.0.1 "
                   "(TRUSTED_HOSTS, against DNS rebinding). Repeatable.")
@click.option("--user", default=None, metavar="USER",
              help="When started as root: read the token, then run as USER with the "
                   "'stockade' group.")
@click.option("--policy-dir", "policy_dirs", multiple=True, metavar="DIR",
              type=click.Path(file_okay=False),
              help="Directory whose policy files the Review page may read by path "
                   "(repeatable; without it, the page takes uploads and pasted text only).")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1, 64))
def webui(bind, token_file, init_token, sockets, trusted_hosts, user, policy_dirs, threads):
    """Serve the policy-review web UI (read-only: reviews are dry runs).

    \b
    Examples:
      stockade webui --init-token                       # at install, as root
      stockade webui --user stockade-webui              # as root: drops to that user
      stockade webui --socket web1=/run/sk-web1/agent.sock --socket db1=/run/sk-db1/agent.sock
      stockade webui --bind 127.0.0.1:9000 --token-file ./webui.token
      stockade webui --user stockade-webui --policy-dir /etc/stockade/policies

    Then open http://127.0.0.1:8470/ and paste the token from the token file.
    """
    from stockade_webui import create_app
    from stockade_webui.auth import TokenFileError, read_token_file, write_token_file

    if init_token:
        try:
            write_token_file(token_file)
        except (OSError, TokenFileError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(token_file)
        return
    host, port = split_bind(bind)
    try:
        token = read_token_file(token_file)
    except TokenFileError as exc:
        raise click.ClickException(f"{exc} (create one with: stockade webui --init-token "
                                   f"--token-file {token_file})") from exc
    if user:
        if os.geteuid() != 0:
            raise click.BadParameter("only root can switch users", param_hint="--user")
        drop_privileges(user)
    elif os.geteuid() == 0:
        click.echo("webui: warning: running as root; pass --user to drop privileges", err=True)
    trusted = ["127.0.0.1", "localhost", *trusted_hosts]
    if host not in ("0.0.0.0", "::") and host not in trusted:
        trusted.append(host)
    app = create_app({"TOKEN": token, "AGENTS": list(sockets) or [socket_for(None)],
                      "TRUSTED_HOSTS": trusted, "POLICY_DIRS": [os.path.abspath(d) for d in policy_dirs]})
    from waitress import serve

    from .common import quiet_libraries
    quiet_libraries()
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"stockade webui: http://{shown}:{port}/  (token in {token_file})", err=True)
    sys.stderr.flush()
    serve(app, host=host, port=port, threads=threads, ident="stockade-webui",
          clear_untrusted_proxy_headers=True, channel_timeout=60)
