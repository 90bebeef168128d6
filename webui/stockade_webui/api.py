"""The pages' data as JSON under /api/v1 (Bearer token or a logged-in session).

    GET  /api/v1/hosts                  agents and their health
    GET  /api/v1/overview
    GET  /api/v1/endpoints?host=&q=&page=&ipage=&cpage=&per_page=
                                        endpoints, identities, ipcache: a page of each
    GET  /api/v1/policies?host=&q=&page=&per_page=
    GET  /api/v1/matrix?host=&label=&port=&page=&cpage=&per_page=
                                        a square of the agent's matrix (rows page,
                                        columns cpage); port=80/tcp: a verdict per pair
    GET  /api/v1/flows?host=&verdict=&from_label=&...   (stockade observe filters)
    GET  /api/v1/map?host=&...
    POST /api/v1/review?host=           {"files": [{"name", "text"}], "replace_all": false}
                                        or multipart "files"; always a dry run

Errors are ``{"error": {"message", "status", ...}}``.
"""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from . import endpoints as endpoints_bp
from . import policies as policies_bp
from . import views
from .agents import host, hosts
from .review import files_from_request

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def _error(status: int, message: str, **extra):
    resp = jsonify({"error": {"message": message, "status": status, **extra}})
    resp.status_code = status
    return resp


@bp.get("/hosts")
def list_hosts():
    return jsonify([{"name": h.name, "socket": h.ref.socket, "health": h.get("health"),
                     "errors": h.errors} for h in hosts()])


@bp.get("/overview")
def overview():
    return jsonify([views.overview(h) for h in hosts()])


@bp.get("/endpoints")
def endpoints():
    return jsonify(endpoints_bp.data())


@bp.get("/policies")
def policies():
    return jsonify(policies_bp.policies_data())


@bp.get("/matrix")
def matrix():
    return jsonify(policies_bp.matrix_data())


@bp.get("/flows")
def flows():
    h = host(request.args.get("host"))
    data = views.flows(h, views.flow_filters(request.args), current_app.config["FLOWS_PAGE_LIMIT"])
    if not data["available"]:
        return _error(503, "; ".join(h.errors) or "flows are not available")
    return jsonify(data)


@bp.get("/map")
def service_map():
    return jsonify(views.service_map(host(request.args.get("host")), views.flow_filters(request.args)))


@bp.post("/review")
def review():
    h = host(request.args.get("host"))
    if request.is_json:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("files"), list) or not all(
                isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("text"), str)
                for f in body["files"]):
            return _error(400, 'send {"files": [{"name": str, "text": str}], "replace_all": bool}')
        files, replace_all = body["files"], bool(body.get("replace_all"))
        hidden: frozenset = frozenset()
    else:
        try:
            files, hidden = files_from_request()
        except views.ReviewInputError as exc:
            return _error(400, str(exc))
        replace_all = request.form.get("replace_all") in ("on", "true", "1")
    result = views.review(h, files, replace_all=replace_all, hidden=hidden)
    if not result["valid"]:
        return _error(400, "the proposed policy set is not valid", errors=result["errors"])
    return jsonify(result)
