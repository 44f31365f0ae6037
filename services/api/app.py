"""The FastAPI application: routes, request metrics, a heartbeat, and no page that needs the internet.

FastAPI's Swagger UI and ReDoc pages load their JavaScript from a CDN, which a plant network does
not reach: they are switched off. The OpenAPI document itself is served at ``/openapi.json`` for
tools (and for the property-based test that drives the API from it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool

from services.api import catalogue, coils, drift, system
from services.api.deps import ApiState
from services.config import Settings
from services.db.engine import make_engine
from services.db.migrate import schema_behind
from services.db.repositories import worker_name
from services.heartbeat import Heartbeat
from services.metrics import METRICS

log = logging.getLogger(__name__)

VERSION = "1"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# FastAPI reads and parses a body before it runs a route's dependencies, the token check among them: without a cap,
# anyone on the plant network could have the API buffer and parse any amount without a token. The only write,
# POST /feedback, takes a few hundred bytes (its comment at most 2,000 characters). Over it: 413.
MAX_BODY_BYTES = 64 * 1024


def create_app(settings: Settings, engine: Engine | None = None, *, heartbeat: bool = True) -> FastAPI:
    """The REST API over ``settings``' database; ``heartbeat`` keeps a ``workers`` row while it serves."""
    owned = engine is None  # `coilguard up` hands in the engine it shares with its worker, and disposes of it
    engine = engine or make_engine(settings.database_url)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        beat = _heartbeat(settings, engine) if heartbeat else None
        try:
            yield
        finally:
            if beat is not None:
                beat.stop()
            if owned:  # the pooled connections close now, not when the server's host process ends
                engine.dispose()

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
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.coilguard = ApiState(settings=settings, engine=engine)
    for module in (system, catalogue, coils, drift):
        app.include_router(module.router)
    app.middleware("http")(_observe)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(DBAPIError)(_database_error)
    app.exception_handler(PoolTimeout)(_database_error)

    @app.get("/", include_in_schema=False)
    def index() -> dict[str, object]:
        # From the OpenAPI document: the routes of included routers are not plain routes with a path.
        return {"service": "coilguard", "openapi": "/openapi.json", "endpoints": sorted(app.openapi()["paths"])}

    return app


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a lone surrogate echoed from a request (``"\\ud800"``
    is valid JSON) has no UTF-8 encoding, and Starlette's UTF-8 JSON raised on it."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _validation_error(_: Request, exc: Exception) -> Response:
    """FastAPI's own 422 body (``detail``: the errors, each with the input at fault), written ASCII-safe."""
    assert isinstance(exc, RequestValidationError)
    return AsciiJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)


async def _database_error(request: Request, exc: Exception) -> Response:
    """A database that cannot be reached (refused, down, the connection lost, no pooled connection free) is a
    503 that says so, as ``/health/ready`` does; any other database error is a fault of this code and stays a
    500."""
    if isinstance(exc, PoolTimeout):  # every pooled connection is taken (by requests stuck on the database)
        reason = "no database connection came free in time"
    else:
        assert isinstance(exc, DBAPIError)
        if not (isinstance(exc, OperationalError) or exc.connection_invalidated or _unavailable(exc)):
            raise exc
        reason = (str(exc.orig or exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if _sqlstate(exc) in SCHEMA_BEHIND:
            # a query of its own: in a thread, not on the event loop that /health/live answers on
            at = await run_in_threadpool(_schema_behind, request.app.state.coilguard.engine)
            if at is None:  # at this release's schema (or newer): a missing table or column is this code's fault
                raise exc
            reason += f" (the schema is at revision {at}, behind this release: `coilguard db upgrade`)"
    password = request.app.state.coilguard.engine.url.password
    if password:  # drivers do not echo it today; the answer goes to anyone on the plant network
        reason = reason.replace(str(password), "***")
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, reason)
    return JSONResponse({"detail": f"database unavailable: {reason}"}, status_code=503)


# PostgreSQL's words for "the database cannot serve this now", whatever the driver's exception class: a read-only
# server after a failover (25006: psycopg raises InternalError), one shutting down (57P01–57P03), out of resources
# (class 53), no connection (class 08), and tables or columns a migration has not made yet
SCHEMA_BEHIND = ("42P01", "42703")
UNAVAILABLE_CLASSES = ("08", "53", "57P")


def _sqlstate(exc: DBAPIError) -> str:
    return str(getattr(exc.orig, "sqlstate", None) or "")


def _schema_behind(engine: Engine) -> str | None:
    """The revision the database is at when it is behind this release, or None (at head, newer, or unreadable)."""
    try:
        with engine.connect() as conn:
            return schema_behind(conn)
    except DBAPIError:
        return None


def _unavailable(exc: DBAPIError) -> bool:
    state = _sqlstate(exc)
    return state.startswith(UNAVAILABLE_CLASSES) or state == "25006" or state in SCHEMA_BEHIND


async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count and time every request by its route template (not its raw path: ids would explode the labels), and by
    its method where it is one of HTTP's (any other would open a series per made-up name). An error no handler
    answered passes through here on its way to Starlette's 500, and is counted as that: an alert on the error
    rate must see it."""
    start = time.perf_counter()
    status = "500"
    try:
        response = await call_next(request)
        status = str(response.status_code)
        return response
    finally:
        route = getattr(request.scope.get("route"), "path", "unmatched")
        method = request.method if request.method in HTTP_METHODS else "other"
        METRICS.api_requests.labels(method, route, status).inc()
        METRICS.api_seconds.labels(route).observe(time.perf_counter() - start)


def _heartbeat(settings: Settings, engine: Engine) -> Heartbeat:
    beat = Heartbeat(engine, "api", f"api-{worker_name()}", every_s=settings.heartbeat_every.total_seconds())
    # the API must come up (and report "not ready") even while the database is away, and be listed once it is back
    return beat.start(first_must_succeed=False)
