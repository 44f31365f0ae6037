"""The FastAPI application: routes, request metrics, a heartbeat, and no page that needs the internet.

FastAPI's Swagger UI and ReDoc pages load their JavaScript from a CDN, which a plant network does
not reach: they are switched off. The OpenAPI document itself is served at ``/openapi.json`` for
tools (and for the property-based test that drives the API from it).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request, Response
from sqlalchemy import Engine

from services.api import catalogue, coils, drift, system
from services.api.deps import ApiState
from services.config import Settings
from services.db.engine import make_engine
from services.db.repositories import worker_name
from services.heartbeat import Heartbeat
from services.metrics import METRICS

log = logging.getLogger(__name__)

VERSION = "1"


def create_app(settings: Settings, engine: Engine | None = None, *, heartbeat: bool = True) -> FastAPI:
    """The REST API over ``settings``' database; ``heartbeat`` keeps a ``workers`` row while it serves."""
    engine = engine or make_engine(settings.database_url)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        beat = _heartbeat(settings, engine) if heartbeat else None
        try:
            yield
        finally:
            if beat is not None:
                beat.stop()

    app = FastAPI(
        title="coilguard",
        version=VERSION,
        description=(
            "System status, models, coils, operator feedback and drift reports of coilguard. "
            "Writes need `Authorization: Bearer <COILGUARD_API_TOKEN>`. Times are ISO 8601 UTC."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.coilguard = ApiState(settings=settings, engine=engine)
    for module in (system, catalogue, coils, drift):
        app.include_router(module.router)
    app.middleware("http")(_observe)

    @app.get("/", include_in_schema=False)
    def index() -> dict[str, object]:
        return {
            "service": "coilguard",
            "openapi": "/openapi.json",
            "endpoints": sorted({r.path for r in app.routes if getattr(r, "include_in_schema", False)}),
        }

    return app


async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count and time every request by its route template (not its raw path: ids would explode the labels)."""
    start = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    METRICS.api_requests.labels(request.method, route, str(response.status_code)).inc()
    METRICS.api_seconds.labels(route).observe(time.perf_counter() - start)
    return response


def _heartbeat(settings: Settings, engine: Engine) -> Heartbeat | None:
    beat = Heartbeat(engine, "api", f"api-{worker_name()}", every_s=settings.heartbeat_every.total_seconds())
    try:
        return beat.start()
    except Exception as exc:  # the API must come up (and report "not ready") even while the database is away
        log.warning("API heartbeat not started (%s); /status will not list this process", exc)
        return None
