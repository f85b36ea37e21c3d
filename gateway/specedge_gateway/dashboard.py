"""The live view: `GET /dashboard` (a self-contained HTML page) and `GET /dashboard/data`
(the JSON it polls about once a second).

The page needs nothing from the internet: plain JavaScript drawing on canvases, shipped
in this package (`static/dashboard.html`). The data joins the draft/verify timeline of
every live verifier and edge agent (`timeline.Timeline`, over the bus) with what this
gateway saw of its own recent requests (`live.LiveStats`): accepted lengths, tokens per
second, TTFT and ITL.

Both routes are open, like `/metrics`: they show no prompt or output, only timings,
counts and service names. `--no-dashboard` (`SPECEDGE_DASHBOARD=false`) removes them.
"""

from __future__ import annotations

import time
from importlib import resources

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse

from specedge_gateway.live import LiveStats
from specedge_gateway.timeline import Timeline


def page() -> str:
    return resources.files("specedge_gateway").joinpath("static/dashboard.html").read_text(encoding="utf-8")


def add_dashboard(app: FastAPI, live: LiveStats) -> None:
    """Register `/dashboard` and `/dashboard/data` on the app (its lifespan sets `app.state.nc`)."""
    html = page()

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/data", include_in_schema=False)
    async def dashboard_data(request: Request, window: float = Query(5.0, ge=1.0, le=30.0)) -> dict:
        state = request.app.state
        if getattr(state, "timeline", None) is None:
            state.timeline = Timeline(state.nc)
        timeline = await state.timeline.snapshot(window)
        return {"generated_at": time.time(), **timeline, **live.summary()}
