"""The console's web application (starlette): pages rendered on the server with Jinja2, JSON for the
live updates, the vendored chart library and the run's own files.

One application serves one view: a run folder (the coordinator view) or a site YAML (the site
view). The pages carry every number and state without JavaScript (a plain form POSTs an approval;
``<noscript>`` reloads a live page); the script only polls, redraws the charts and swaps the
refreshed parts in. See :mod:`arkfed.console.security` for the login, CSRF and header rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from arkfed.console.security import SESSION_COOKIE, Guard, security_headers

HERE = Path(__file__).resolve().parent
RUN_FILES = {"config.yaml": "text/plain; charset=utf-8", "provenance.json": "application/json", "summary.json": "application/json"}
REPORT_TYPES = {".html": "text/html; charset=utf-8", ".png": "image/png", ".json": "application/json", ".csv": "text/csv"}
PUBLIC_PATHS = ("/static/", "/login", "/favicon.ico")


@dataclass
class ConsoleTarget:
    """What one console serves: ``kind`` "run" (a run folder) or "site" (a site YAML)."""

    kind: str
    path: Path
    poll_seconds: float = 2.0
    tls: bool = False


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _size(value) -> str:
    value = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["num"] = _num
    templates.env.filters["size"] = _size
    templates.env.filters["value"] = lambda value: f"{value:.6g}" if isinstance(value, float) else value
    templates.env.filters["compact"] = lambda value: value if isinstance(value, str) else json.dumps(value, default=str)
    return templates


class GuardMiddleware(BaseHTTPMiddleware):
    """Allowed hosts, the session cookie, the login wall and the security headers, for every request."""

    def __init__(self, app, guard: Guard, tls: bool):
        super().__init__(app)
        self.guard, self.tls = guard, tls

    async def dispatch(self, request: Request, call_next) -> Response:
        guard = self.guard
        if not guard.host_ok(request.headers.get("host")):
            response: Response = PlainTextResponse("unknown host", status_code=400)
        else:
            session = guard.session(request.cookies)
            fresh = session is None
            request.state.session = session = session or guard.new_session()
            if guard.authenticated(session) or request.url.path.startswith(PUBLIC_PATHS):
                response = await call_next(request)
            elif request.url.path.startswith("/api/"):
                response = JSONResponse({"error": "login required"}, status_code=401)
            else:
                response = RedirectResponse("/login", status_code=303)
            if fresh and SESSION_COOKIE not in response.headers.get("set-cookie", ""):
                set_session_cookie(response, session, self.tls)
        report = request.url.path.startswith("/files/report/")
        for name, value in security_headers(self.tls, report=report).items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response


def set_session_cookie(response: Response, session: str, tls: bool) -> None:
    response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", secure=tls, path="/")


def _context(request: Request, guard: Guard, target: ConsoleTarget, **extra) -> dict:
    return {"csrf": guard.csrf(request.state.session), "login": guard.login, "poll": target.poll_seconds,
            "kind": target.kind, **extra}


def _forbidden_post(request: Request, guard: Guard, form) -> Response | None:
    if not guard.origin_ok(request.headers.get("origin"), request.headers.get("host")):
        return PlainTextResponse("refused: the form was posted from another site", status_code=403)
    if not guard.csrf_ok(request.state.session, form.get("csrf")):
        return PlainTextResponse("refused: missing or wrong CSRF token (reload the page and try again)", status_code=403)
    return None


def login_routes(guard: Guard, target: ConsoleTarget, templates: Jinja2Templates) -> list[Route]:
    async def login_page(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", _context(request, guard, target, failed=False))

    async def login(request: Request) -> Response:
        form = await request.form()
        refused = _forbidden_post(request, guard, form)
        if refused is not None:
            return refused
        if not guard.credentials_ok(str(form.get("secret") or "")):
            return templates.TemplateResponse(request, "login.html", _context(request, guard, target, failed=True), status_code=403)
        guard.sessions.pop(request.state.session, None)
        response = RedirectResponse("/", status_code=303)
        set_session_cookie(response, guard.new_session(authenticated=True), target.tls)
        return response

    async def logout(request: Request) -> Response:
        form = await request.form()
        refused = _forbidden_post(request, guard, form)
        if refused is not None:
            return refused
        guard.sessions.pop(request.state.session, None)
        return RedirectResponse("/login" if guard.login else "/", status_code=303)

    return [Route("/login", login_page, methods=["GET"]), Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"])]


def run_routes(guard: Guard, target: ConsoleTarget, templates: Jinja2Templates) -> list[Route]:
    from arkfed.console.run_view import run_view

    async def page(request: Request) -> Response:
        view = run_view(target.path)
        return templates.TemplateResponse(request, "run.html", _context(request, guard, target, view=view))

    async def api(request: Request) -> Response:
        return JSONResponse(run_view(target.path))

    async def run_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name in RUN_FILES and (target.path / name).is_file():
            return FileResponse(target.path / name, media_type=RUN_FILES[name])
        return PlainTextResponse("not found", status_code=404)

    async def report_file(request: Request) -> Response:
        name = request.path_params["name"]
        path = target.path / "report" / name
        if "/" in name or name.startswith(".") or path.suffix not in REPORT_TYPES or not path.is_file():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, media_type=REPORT_TYPES[path.suffix])

    return [Route("/", page), Route("/api/run", api), Route("/files/report/{name}", report_file), Route("/files/{name}", run_file)]


def site_routes(guard: Guard, target: ConsoleTarget, templates: Jinja2Templates) -> list[Route]:
    from arkfed.console.site_view import site_view
    from arkfed.errors import ArkfedError
    from arkfed.site.config import load_site_config
    from arkfed.site.policy import approve_run, pending_runs, refuse_run

    def config():
        return load_site_config(target.path)

    async def page(request: Request) -> Response:
        view = site_view(config())
        done = request.query_params.get("done", "")
        return templates.TemplateResponse(request, "site.html", _context(request, guard, target, view=view, done=done))

    async def api(request: Request) -> Response:
        return JSONResponse(site_view(config()))

    async def decide(request: Request) -> Response:
        form = await request.form()
        refused = _forbidden_post(request, guard, form)
        if refused is not None:
            return refused
        fingerprint, action = str(form.get("fingerprint") or ""), request.path_params["action"]
        if action not in ("approve", "refuse"):
            return PlainTextResponse("not found", status_code=404)
        state_dir = config().local_state_dir
        if fingerprint not in {entry.get("fingerprint") for entry in pending_runs(state_dir)}:
            return PlainTextResponse(f"no run {fingerprint[:16]!r} waits for approval", status_code=404)
        try:
            (approve_run if action == "approve" else refuse_run)(state_dir, fingerprint)
        except ArkfedError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        word = "approved" if action == "approve" else "refused"
        return RedirectResponse(f"/?done={quote(f'{word} {fingerprint}')}", status_code=303)

    return [Route("/", page), Route("/api/site", api), Route("/runs/{action:str}", decide, methods=["POST"])]


def create_app(target: ConsoleTarget, guard: Guard | None = None) -> Starlette:
    """The console for ``target``; ``guard`` holds its login and CSRF state (default: no login)."""
    guard = guard or Guard()
    templates = make_templates()
    routes = run_routes(guard, target, templates) if target.kind == "run" else site_routes(guard, target, templates)
    static = Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    icon = Route("/favicon.ico", lambda request: RedirectResponse("/static/favicon.svg", status_code=301))
    routes = [*routes, *login_routes(guard, target, templates), static, icon]
    return Starlette(routes=routes, middleware=[Middleware(GuardMiddleware, guard=guard, tls=target.tls)])
