"""Flows (a live table with the ``stockade observe`` filters) and the service map."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template, request

from . import views
from .agents import host

bp = Blueprint("flows", __name__)


def _data(h):
    return views.flows(h, views.flow_filters(request.args), current_app.config["FLOWS_PAGE_LIMIT"])


@bp.route("/flows")
def index():
    h = host(request.args.get("host"))
    return render_template("flows.html", data=_data(h), current=h, args=request.args)


@bp.route("/flows/rows")
def rows():
    """The table body alone, for auto-refresh."""
    h = host(request.args.get("host"))
    return render_template("_flow_rows.html", data=_data(h))


@bp.route("/map")
def service_map():
    h = host(request.args.get("host"))
    return render_template("map.html", data=views.service_map(h, views.flow_filters(request.args)),
                           current=h, args=request.args)
