"""Liveness, readiness, system status and Prometheus metrics: what Kubernetes and dashboards poll."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import text

from services.api import queries
from services.api.deps import State
from services.api.schemas import Backlog, Check, Liveness, ModelRef, Readiness, SystemStatus, WorkerOut
from services.config import Settings
from services.db.migrate import schema_behind, upgrade_needed
from services.mqtt.client import MqttClient

router = APIRouter(tags=["system"])

BROKER_TIMEOUT_S = 3.0


@router.get("/health/live", response_model=Liveness, summary="The process answers (liveness probe)")
async def live() -> Liveness:
    """On the event loop, not the thread pool: requests stuck on an unreachable database must not starve the
    liveness probe and have the pod restarted for the database's fault."""
    return Liveness()


@router.get(
    "/health/ready",
    response_model=Readiness,
    summary="Database reachable (readiness probe)",
    responses={503: {"model": Readiness, "description": "The database is not reachable."}},
)
def ready(state: State) -> Response:
    """Only the database: the API serves nothing through MQTT, and a broker outage must not take the API (status,
    feedback) out of the Service exactly when operators need it. ``/status`` reports the broker."""
    checks = {"database": _timed(lambda: _database(state))}
    body = Readiness(status="ready" if all(c.ok for c in checks.values()) else "not ready", checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.status == "ready" else 503)


def _timed(check) -> Check:
    start = time.perf_counter()
    try:
        detail = check()
        ok = True
    except Exception as exc:  # any failure means "not ready"; the reason goes to the caller
        detail, ok = f"{type(exc).__name__}: {exc}"[:500], False
    return Check(ok=ok, detail=detail, took_ms=round((time.perf_counter() - start) * 1000, 1))


def _database(state: State) -> str:
    """Reachable, and at this release's schema: an API that starts before the migration has run would otherwise
    be put in service while every route fails on a missing table."""
    with state.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        at = schema_behind(conn)
    if at is not None:
        raise SchemaBehind(upgrade_needed(at))
    return state.engine.dialect.name


class SchemaBehind(RuntimeError):
    """The database answers but its schema is older than this release's."""


def _broker(settings: Settings) -> str:
    """A short MQTT connect with a throw-away client id (never one of a worker's persistent sessions)."""
    url = settings.mqtt
    client = MqttClient(url, client_id=f"coilguard-ready-{uuid.uuid4().hex[:12]}")
    client.connect(timeout=BROKER_TIMEOUT_S)
    client.close()
    return url.redacted()


@router.get(
    "/status", response_model=SystemStatus, summary="Workers alive, last decision, backlog, active models, broker"
)
def system_status(state: State) -> SystemStatus:
    now = datetime.now(UTC)
    rows = queries.workers_seen(state.engine, now, state.settings.heartbeat_every)
    facts = queries.decision_facts(state.engine, now, state.settings.announce_after)
    alive: dict[str, int] = {}
    for w in rows:
        alive[w.kind] = alive.get(w.kind, 0) + int(w.alive)
    queued = sum(int(w.info.get("backlog") or 0) for w in rows if w.alive and w.kind == "assess")
    return SystemStatus(
        now=now,
        workers=[WorkerOut(**queries.finite(w.__dict__)) for w in rows],
        alive=alive,
        last_decision_at=facts["last_decision_at"],
        coils_last_24h=facts["coils_last_24h"],
        backlog=Backlog(
            pending_coils=facts["pending_coils"],
            queued_in_workers=queued,
            unannounced_decisions=facts["unannounced_decisions"],
        ),
        active_models=[
            ModelRef(id=m.id, name=m.name, kind=m.kind, version=m.version, promoted_at=m.promoted_at)
            for m in queries.active_models(state.engine)
        ],
        broker=state.broker.get(lambda: _timed(lambda: _broker(state.settings))),
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics of this API process",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."}},
)
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
