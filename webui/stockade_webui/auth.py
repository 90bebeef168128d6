"""Login with the install token, the session, CSRF and the security headers.

- Pages need a session made by POST /login with the token; the session cookie is
  HttpOnly and SameSite=Strict and holds a fingerprint of the token, so replacing the
  token file and restarting ends every session, and a random session id that must be
  in the server's set of open sessions (Sessions): logout removes it, so a copy of the
  cookie is worthless afterwards.
- Login: 5 wrong tokens within a minute from one client address, then 429 until that
  minute is over (LoginLimiter).
- After login the browser goes to ``next`` only when it is a path of this site.
- /api/v1 accepts ``Authorization: Bearer <token>`` (no cookie, no CSRF needed) or a
  logged-in session.
- Every POST made with a session carries the session's CSRF token, as the form field
  ``csrf_token`` or the header ``X-CSRF-Token``; a missing or wrong one is 400.
- Every response gets a Content-Security-Policy with a per-request nonce: scripts only
  from /static (or nonce'd), no inline styles, nothing from other origins.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, g, jsonify, redirect, render_template, request, session, url_for

bp = Blueprint("auth", __name__)

PUBLIC_ENDPOINTS = {"auth.login", "static"}
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class TokenFileError(Exception):
    pass


def read_token_file(path: str) -> str:
    """The token; refuses an empty file, and one that others may read."""
    p = Path(path)
    try:
        st = p.stat()
        token = p.read_text().strip()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror}") from exc
    if st.st_mode & stat.S_IROTH:
        raise TokenFileError(f"token file {path} is readable by everyone; chmod o-r it")
    if len(token) < 16:
        raise TokenFileError(f"token file {path} holds no token of 16 characters or more")
    return token


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_token_file(path: str) -> str:
    """Create ``path`` with a random token, mode 0600 (root-only when run as root, as at
    install); an existing file is kept. Returns the token."""
    p = Path(path)
    if p.exists():
        return read_token_file(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    token = new_token()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class Sessions:
    """Open session ids and their expiry (time.monotonic()), at most ``cap`` (the oldest
    go first)."""

    def __init__(self, lifetime: float, cap: int = 10000):
        self.lifetime, self.cap = lifetime, cap
        self._open: dict[str, float] = {}
        self._lock = threading.Lock()

    def open(self) -> str:
        sid = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            for old in [k for k, t in self._open.items() if t < now]:
                del self._open[old]
            while len(self._open) >= self.cap:
                del self._open[next(iter(self._open))]
            self._open[sid] = now + self.lifetime
        return sid

    def valid(self, sid) -> bool:
        with self._lock:
            t = self._open.get(sid) if isinstance(sid, str) else None
            return t is not None and t >= time.monotonic()

    def close(self, sid) -> None:
        with self._lock:
            self._open.pop(sid, None)


class LoginLimiter:
    """``limit`` failed logins per ``window`` seconds per client address: the window
    starts at the first failure; once it holds ``limit`` failures every login is refused
    until it ends."""

    def __init__(self, limit: int = 5, window: float = 60.0, cap: int = 10000):
        self.limit, self.window, self.cap = limit, window, cap
        self._fails: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again; 0: now."""
        now = time.monotonic()
        with self._lock:
            start, count = self._fails.get(client, (now, 0))
            if now - start >= self.window:
                self._fails.pop(client, None)
                return 0
            return max(1, int(start + self.window - now + 0.999)) if count >= self.limit else 0

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            start, count = self._fails.get(client, (now, 0))
            if now - start >= self.window:
                start, count = now, 0
            if client not in self._fails and len(self._fails) >= self.cap:
                for old in [k for k, (t, _) in self._fails.items() if now - t >= self.window]:
                    del self._fails[old]
                if len(self._fails) >= self.cap:
                    del self._fails[next(iter(self._fails))]
            self._fails[client] = (start, count + 1)


def _fingerprint(token: str) -> str:
    return hashlib.sha256(b"stockade-webui:" + token.encode()).hexdigest()[:32]


def check_token(given: str | None) -> bool:
    want = current_app.config["TOKEN"]
    return given is not None and bool(given) and hmac.compare_digest(given.strip().encode(), want.encode())


def logged_in() -> bool:
    return session.get("auth") == _fingerprint(current_app.config["TOKEN"]) and \
        current_app.extensions["stockade_sessions"].valid(session.get("sid"))


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value if scheme.lower() == "bearer" and value else None


def _is_api() -> bool:
    return request.path.startswith("/api/")


def _api_error(status: int, message: str):
    resp = jsonify({"error": {"message": message, "status": status}})
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="stockade-webui"'
    return resp


def guard():
    """before_request: authentication, then CSRF for unsafe methods."""
    g.csp_nonce = secrets.token_urlsafe(16)
    g.via_bearer = False
    if request.endpoint == "static" or request.routing_exception is not None:
        return None     # 404/405 (or an untrusted Host): Flask answers with the error
    if _is_api():
        token = _bearer()
        if token is not None:
            if not check_token(token):
                return _api_error(401, "wrong token")
            g.via_bearer = True
            return None
        if not logged_in():
            return _api_error(401, "log in, or send Authorization: Bearer <token>")
    elif request.endpoint not in PUBLIC_ENDPOINTS and not logged_in():
        if request.method in UNSAFE_METHODS:
            abort(401)
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    if request.method in UNSAFE_METHODS:
        sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token")
        want = session.get("csrf")
        if not sent or not want or not hmac.compare_digest(sent.encode(), want.encode()):
            if _is_api():
                return _api_error(400, "CSRF token missing or wrong (send X-CSRF-Token)")
            return render_template("error.html", status=400, title="Form expired",
                                   message="The form's security token is missing or wrong. "
                                           "Reload the page and try again."), 400
    return None


def security_headers(resp):
    nonce = g.get("csp_nonce", "")
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; "
        f"script-src 'self' 'nonce-{nonce}'; "
        "style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    resp.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    if request.endpoint != "static":
        resp.headers["Cache-Control"] = "no-store"
    return resp


def _safe_next(target: str | None) -> str:
    """``target`` if it is a path of this site, else the overview. Browsers drop tabs and
    newlines from URLs (``/\t/evil.example`` is ``//evil.example``) and read ``\\`` as
    ``/``: any control character, space or backslash refuses it."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return url_for("overview.index")
    if any(ord(c) < 33 or ord(c) == 127 or c == "\\" for c in target):
        return url_for("overview.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/") or parts.path.startswith("//"):
        return url_for("overview.index")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        limiter = current_app.extensions["stockade_login_limiter"]
        client = request.remote_addr or "unknown"
        wait = limiter.retry_after(client)
        if wait:
            current_app.logger.warning("login from %s refused: too many wrong tokens", client)
            return render_template("error.html", status=429, title="Too many tries",
                                   message=f"Too many wrong tokens from your address: try again "
                                           f"in {wait} seconds."), 429, {"Retry-After": str(wait)}
        if check_token(request.form.get("token")):
            keep_next = request.form.get("next")
            current_app.extensions["stockade_sessions"].close(session.get("sid"))
            session.clear()                   # a new session: no fixation
            session["auth"] = _fingerprint(current_app.config["TOKEN"])
            session["sid"] = current_app.extensions["stockade_sessions"].open()
            session.permanent = True
            csrf_token()
            return redirect(_safe_next(keep_next))
        limiter.failed(client)
        error = "That token is not right."
        current_app.logger.warning("failed login from %s", client)
    return render_template("login.html", error=error, next=request.values.get("next", "")), \
        (401 if error else 200)


@bp.route("/logout", methods=["POST"])
def logout():
    current_app.extensions["stockade_sessions"].close(session.get("sid"))
    session.clear()
    return redirect(url_for("auth.login"))


def init_app(app) -> None:
    lifetime = app.config["PERMANENT_SESSION_LIFETIME"]
    app.extensions["stockade_sessions"] = Sessions(
        lifetime.total_seconds() if hasattr(lifetime, "total_seconds") else float(lifetime))
    app.extensions["stockade_login_limiter"] = LoginLimiter(
        app.config.get("LOGIN_FAILURES_PER_MINUTE", 5), 60.0)
    app.before_request(guard)
    app.after_request(security_headers)

    @app.context_processor
    def _inject():
        return {"csrf_token": csrf_token, "csp_nonce": lambda: g.get("csp_nonce", ""),
                "logged_in": logged_in}
