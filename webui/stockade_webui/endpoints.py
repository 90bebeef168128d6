"""Endpoints, identities and the ipcache of one agent, searchable (``?q=`` on the server,
and filtered as you type by static/app.js) and paged on the server (paging.py):
``page`` (endpoints), ``ipage`` (identities), ``cpage`` (ipcache), ``per_page``."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template, request

from . import paging, views
from .agents import host

bp = Blueprint("endpoints", __name__)


def data(tables: tuple = ("endpoints", "identities", "ipcache")) -> dict:
    """The endpoints view of ``?host=`` for the request's q, pages and per_page."""
    args = request.args
    pages = {t: paging.number(args, param, 1) for t, param in views.ENDPOINT_TABLES.items()}
    per = paging.number(args, "per_page", current_app.config["PAGE_SIZE"], paging.MAX_PER_PAGE)
    return views.endpoints(host(args.get("host")), args.get("q", ""), pages, per, tables)


@bp.route("/endpoints")
def index():
    d = data(("endpoints", "ipcache"))
    return render_template("endpoints.html", data=d, current=host(request.args.get("host")))


@bp.route("/identities")
def identities():
    d = data(("identities",))
    return render_template("identities.html", data=d, current=host(request.args.get("host")))
