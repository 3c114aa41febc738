"""The dashboard at / of `gristmill serve`: batches, one batch with its charts, workers, schedules.

Server-rendered HTML (Jinja2 templates in producer/templates), charts as inline SVG drawn by
producer.charts: no JavaScript and nothing from the internet. A page refreshes itself every few
seconds while something it shows is running. It takes the API's keys: a browser signs in once at
/login (the key goes into an HttpOnly cookie), an admin key sees every project, a project's key only
its own batches; on a laptop with no key created, no sign-in.
"""


from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from producer import charts
from producer.progress import duration, eta_s
from producer.service import Service
from schema import workers
from schema.db import aware, seconds_between, utcnow
from schema.errors import BatchNotFound
from schema.settings import Settings

COOKIE = "gristmill_key"
REFRESH_S = 5
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                        autoescape=select_autoescape(["html"]))


class SignIn(Exception):
    """No valid key came with the request: the browser goes to /login."""


def _time(value: datetime | int | None) -> str:
    if value is None:
        return "-"
    when = datetime.fromtimestamp(value, UTC) if isinstance(value, int) else aware(value)
    return f"{when:%Y-%m-%d %H:%M:%S} UTC"


def _number(value: float | None) -> str:
    """Three significant digits at least, thousands separated: 2,272  41.3  0.0042."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


TEMPLATES.filters.update(duration=duration, time=_time, number=_number)


def router(settings: Settings, service: Service, identify: Callable[[str], Any]) -> APIRouter:
    pages = APIRouter(include_in_schema=False)

    def viewer(request: Request) -> Service:
        """The service as the signed-in key sees it (its project's batches, or all for an admin)."""
        header = request.headers.get("authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else request.cookies.get(COOKIE, "")
        who = identify(key)
        if who is None:
            raise SignIn()
        return service.scoped(who.project)

    View = Annotated[Service, Depends(viewer)]

    def page(template: str, refresh: bool, **values: Any) -> HTMLResponse:
        html = TEMPLATES.get_template(template).render(refresh_s=REFRESH_S if refresh else None, **values)
        return HTMLResponse(html)

    @pages.get("/login")
    def login_form(failed: bool = False) -> HTMLResponse:
        return page("login.html", False, failed=failed)

    @pages.post("/login")
    def login(key: Annotated[str, Form()]) -> Response:
        if identify(key.strip()) is None:
            return RedirectResponse("/login?failed=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict")
        return response

    @pages.get("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @pages.get("/", response_class=HTMLResponse)
    def batches(view: View, after: str | None = None) -> HTMLResponse:
        listed = view.list_batches(51, after)
        rows = [(b, eta_s(b)) for b in listed[:50]]
        return page("batches.html", any(not b.done for b, _ in rows), batches=rows,
                    older=listed[49].id if len(listed) > 50 else None)

    @pages.get("/batches/{batch_id}", response_class=HTMLResponse)
    def batch(view: View, batch_id: str) -> HTMLResponse:
        try:
            info = view.status(batch_id)
        except BatchNotFound:
            return HTMLResponse(TEMPLATES.get_template("missing.html").render(batch_id=batch_id), status_code=404)
        summary = view.stats(batch_id)
        svgs = {name: charts.svg(summary, name) for name in charts.CHARTS}
        return page("batch.html", not info.done, batch=info, eta=eta_s(info), summary=summary, charts=svgs)

    @pages.get("/batches/{batch_id}/output.jsonl")
    def output(view: View, batch_id: str) -> Response:
        """Every finished item's line in input order (OpenAI's output and error lines together)."""
        try:
            view.status(batch_id)
        except BatchNotFound:
            return HTMLResponse(TEMPLATES.get_template("missing.html").render(batch_id=batch_id), status_code=404)
        lines: Iterator[bytes] = (r.line.model_dump_json().encode() + b"\n" for r in view.output(batch_id))
        return StreamingResponse(lines, media_type="application/jsonl", headers={
            "content-disposition": f'attachment; filename="{batch_id}.jsonl"'})

    @pages.get("/workers", response_class=HTMLResponse)
    def worker_list(view: View) -> HTMLResponse:
        now = utcnow()
        rows = [(w, seconds_between(w.seen_at, now)) for w in workers.live(settings)]
        return page("workers.html", True, workers=rows)

    @pages.get("/schedules", response_class=HTMLResponse)
    def schedules(view: View) -> HTMLResponse:
        runs = view.schedule_runs()
        latest: dict[str, Any] = {}
        for run, status in runs:
            latest.setdefault(run.schedule, (run, status))
        return page("schedules.html", any(run.status in ("started", "running") for run, _ in runs),
                    latest=latest, runs=runs)

    return pages


def sign_in_handler(_: Request, __: Exception) -> Response:
    return RedirectResponse("/login", status_code=303)

