"""Live policies in words (who may reach whom), and the identity matrix."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template, request

from . import paging, views
from .agents import host

bp = Blueprint("policies", __name__)


def policies_data() -> dict:
    """The policies of ``?host=`` matching q, page ``page`` of per_page."""
    args = request.args
    return views.policies(host(args.get("host")), args.get("q", ""), paging.number(args, "page", 1),
                          paging.number(args, "per_page", current_app.config["PAGE_SIZE"],
                                        paging.MAX_PER_PAGE))


@bp.route("/policies")
def index():
    return render_template("policies.html", data=policies_data(), current=host(request.args.get("host")))


MATRIX_MAX_PER_PAGE = 100


def matrix_data() -> dict:
    """The matrix square of ``?host=`` asked by label, port, page (rows), cpage
    (columns) and per_page (rows and columns, at most MATRIX_MAX_PER_PAGE)."""
    args = request.args
    return views.matrix(host(args.get("host")), args.get("label", "").strip(),
                        args.get("port", "").strip(), paging.number(args, "page", 1),
                        paging.number(args, "cpage", 1),
                        paging.number(args, "per_page", current_app.config["MATRIX_PAGE_SIZE"],
                                      MATRIX_MAX_PER_PAGE),
                        cidrs=args.get("cidrs"))


@bp.route("/matrix")
def matrix():
    return render_template("matrix.html", data=matrix_data(), current=host(request.args.get("host")))
