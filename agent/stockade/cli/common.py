"""Shared CLI plumbing: output format, errors to exit codes."""
from __future__ import annotations

import functools
import json
import sys

import click

from ..errors import StockadeError

output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True, help="Output format.")


QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "waitress", "werkzeug")


def quiet_libraries(level: str = "info") -> None:
    """Third-party request logging (httpx's "HTTP Request" lines, waitress) only at debug."""
    import logging
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


POLICY_SUFFIXES = (".yaml", ".yml", ".json")
STDIN_NAME = "<stdin>"


def policy_sources(args) -> list:
    """Command-line policy FILES: a file stays a path, a directory gives its *.yaml, *.yml
    and *.json files (recursively, sorted), ``-`` gives {"name": "<stdin>", "text": ...}."""
    from pathlib import Path
    out: list = []
    for arg in args:
        if arg == "-":
            out.append({"name": STDIN_NAME, "text": click.get_text_stream("stdin").read()})
        elif Path(arg).is_dir():
            found = sorted(str(p) for p in Path(arg).rglob("*")
                           if p.suffix in POLICY_SUFFIXES and p.is_file())
            if not found:
                raise click.UsageError(f"{arg}: no .yaml, .yml or .json files in this directory")
            out.extend(found)
        else:
            out.append(arg)
    return out


def emit_yaml(obj) -> None:
    import yaml
    click.echo(yaml.safe_dump(obj, sort_keys=False), nl=False)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))


def handle_errors(fn):
    """StockadeError -> message on stderr (JSON with -o json) and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StockadeError as exc:
            if kwargs.get("output") == "json":
                click.echo(json.dumps({"error": exc.to_dict()}, indent=2), err=False)
            else:
                click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper
