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
