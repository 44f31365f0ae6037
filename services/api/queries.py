"""The API's read queries (and its one write), in SQLAlchemy Core over the tables of DESIGN §4.

Kept apart from ``services/db/repositories.py``, whose classes implement the workflows' ports: these
queries exist only for people and dashboards looking at the system.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Engine, Row, Select, and_, func, or_, select

from services.api.schemas import COIL_ID_PATTERN
from services.db.models import Assessment, Coil, DriftReport, Feedback, Model, ModelPerformance, Worker
from services.db.repositories import SqlCoilStore, latest_feedback, newest_scores, stored_matrix

coils = Coil.__table__
assessments = Assessment.__table__
feedback = Feedback.__table__
models = Model.__table__
mperformance = ModelPerformance.__table__
drift_reports = DriftReport.__table__
workers = Worker.__table__

ALIVE_AFTER_BEATS = 3  # a worker not seen for this many heartbeat intervals is gone


_COIL_ID = re.compile(COIL_ID_PATTERN)


class BadCursor(ValueError):
    """A page cursor that this API did not hand out."""


# ----------------------------------------------------------------------------- system status


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    kind: str
    host: str
    pid: int
    started_at: datetime
    seen_at: datetime
    alive: bool
    info: dict[str, Any]


def workers_seen(engine: Engine, now: datetime, heartbeat_every: timedelta) -> list[WorkerRow]:
    """Every worker row, newest first, marked alive when seen within three heartbeat intervals."""
    cutoff = now - ALIVE_AFTER_BEATS * heartbeat_every
    with engine.connect() as conn:
        rows = conn.execute(select(workers).order_by(workers.c.kind, workers.c.seen_at.desc())).all()
    return [
        WorkerRow(r.worker_id, r.kind, r.host, r.pid, r.started_at, r.seen_at, r.seen_at >= cutoff, r.info or {})
        for r in rows
    ]


def decision_facts(engine: Engine, now: datetime, announce_after: timedelta) -> dict[str, Any]:
    """When the last coil was decided, how many in the last 24 h, how many wait for a decision, and how many
    decisions older than ``announce_after`` never reached the broker (through the partial index of 0007)."""
    with engine.connect() as conn:
        last = conn.execute(select(func.max(coils.c.decided_at))).scalar()
        recent = conn.execute(select(func.count()).where(coils.c.decided_at >= now - timedelta(hours=24))).scalar()
        pending = conn.execute(select(func.count()).where(coils.c.status == "pending")).scalar()
    unannounced, _ = SqlCoilStore(engine).count_unannounced(now - announce_after)
    return {
        "last_decision_at": last,
        "coils_last_24h": int(recent or 0),
        "pending_coils": int(pending or 0),
        "unannounced_decisions": unannounced,
    }


def active_models(engine: Engine) -> list[Row]:
    with engine.connect() as conn:
        return list(conn.execute(select(models).where(models.c.status == "active").order_by(models.c.name)))


# ----------------------------------------------------------------------------- models


def model_versions(engine: Engine, name: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
    """Model versions with their newest ``mperformance`` row of their present (or last) time in service, grouped
    by name (oldest version first)."""
    newest = newest_scores()
    perf = mperformance.alias("perf")
    query = (
        select(models, *(perf.c[c].label(f"perf_{c}") for c in _PERFORMANCE_COLUMNS))
        .outerjoin(newest, newest.c.model_id == models.c.id)
        .outerjoin(perf, perf.c.id == newest.c.id)
        .order_by(models.c.name, models.c.version)
    )
    # The active version is the model's, not the page's: looked up apart from the status filter, so
    # that ?status=retired does not say "none active" while one serves.
    serving = select(models.c.name, models.c.version).where(models.c.status == "active").order_by(models.c.version)
    if name is not None:
        query = query.where(models.c.name == name)
        serving = serving.where(models.c.name == name)
    if status is not None:
        query = query.where(models.c.status == status)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        active = {r.name: r.version for r in conn.execute(serving)}  # the newest, should two be active
    grouped: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = grouped.setdefault(
            r.name, {"name": r.name, "kind": r.kind, "active_version": active.get(r.name), "versions": []}
        )
        entry["kind"] = r.kind  # the newest version's kind
        performance = None
        if r.perf_computed_at is not None:
            performance = {c: getattr(r, f"perf_{c}") for c in _PERFORMANCE_COLUMNS}
        entry["versions"].append(
            {
                "id": r.id,
                "version": r.version,
                "status": r.status,
                "created_at": r.created_at,
                "promoted_at": r.promoted_at,
                "retired_at": r.retired_at,
                "parent_id": r.parent_id,
                "validation": finite((r.metrics or {}).get("validation")),
                "latest_performance": performance,
            }
        )
    return list(grouped.values())


_PERFORMANCE_COLUMNS = (
    "computed_at",
    "window_start",
    "window_end",
    "n_coils",
    "n_correct",
    "score",
    "precision_nok",
    "recall_nok",
    "below_threshold",
)


# ----------------------------------------------------------------------------- coils


def encode_cursor(received_at: datetime, coil_id: str) -> str:
    raw = f"{received_at.astimezone(UTC).isoformat()}|{coil_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor names, in UTC; anything :func:`encode_cursor` cannot have written is a
    :class:`BadCursor` (400), including a forged time that has no UTC equivalent (year 1 at +05:00)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, coil_id = raw.split("|", 1)
        when = datetime.fromisoformat(stamp)
        if when.tzinfo is None or not _COIL_ID.fullmatch(coil_id):
            raise ValueError("no offset, or not a coil id")
        when = when.astimezone(UTC)  # here, not when the driver binds it: OverflowError was a 500
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise BadCursor("not a cursor from this API: pass next_cursor from the previous page") from exc
    return when, coil_id


def _coil_columns(engine: Engine) -> tuple[Select, Any]:
    latest = latest_feedback(engine)
    query = select(
        coils.c.coil_id,
        coils.c.line,
        coils.c.status,
        coils.c.produced_at,
        coils.c.received_at,
        coils.c.decided_at,
        coils.c.p_nok,
        coils.c.confidence,
        latest.c.label.label("operator_label"),
    ).outerjoin(latest, latest.c.coil_id == coils.c.coil_id)
    return query, latest


def coil_page(
    engine: Engine,
    *,
    line: str | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first by ``received_at`` (then coil id); keyset paging, so new coils never shift a page."""
    query, _ = _coil_columns(engine)
    if line is not None:
        query = query.where(coils.c.line == line)
    if status is not None:
        query = query.where(coils.c.status == status)
    if since is not None:
        query = query.where(coils.c.received_at >= since)
    if until is not None:
        query = query.where(coils.c.received_at < until)
    if cursor is not None:
        when, coil_id = decode_cursor(cursor)
        query = query.where(
            or_(coils.c.received_at < when, and_(coils.c.received_at == when, coils.c.coil_id < coil_id))
        )
    query = query.order_by(coils.c.received_at.desc(), coils.c.coil_id.desc()).limit(limit + 1)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["received_at"], rows[-1]["coil_id"]) if more else None
    return rows, next_cursor


def coil_detail(engine: Engine, coil_id: str, with_matrix: bool = False) -> dict[str, Any] | None:
    """One coil with its votes (and the voting model versions) and every feedback row, oldest first."""
    query, _ = _coil_columns(engine)
    query = query.add_columns(coils.c.product, coils.c.matrix).where(coils.c.coil_id == coil_id)
    votes = (
        select(
            models.c.name.label("model"),
            models.c.version,
            assessments.c.model_id,
            assessments.c.label,
            assessments.c.p_nok,
            assessments.c.confidence,
            assessments.c.created_at,
        )
        .join(models, models.c.id == assessments.c.model_id)
        .where(assessments.c.coil_id == coil_id)
        .order_by(models.c.name)
    )
    given = select(feedback).where(feedback.c.coil_id == coil_id).order_by(feedback.c.created_at, feedback.c.id)
    with engine.connect() as conn:
        row = conn.execute(query).first()
        if row is None:
            return None
        detail = dict(row._mapping)
        detail["votes"] = [dict(v._mapping) for v in conn.execute(votes)]
        detail["feedback"] = [dict(f._mapping) for f in conn.execute(given)]
    matrix = detail.pop("matrix")
    readings = stored_matrix(matrix) if with_matrix else None
    detail["matrix"] = _matrix_json(readings) if readings is not None else None
    return detail


def _matrix_json(matrix: np.ndarray) -> list[list[float | None]]:
    """NaN (a dropped reading) is not JSON: it becomes null."""
    rounded = np.round(matrix.astype(np.float64), 3)
    return [[None if np.isnan(v) else float(v) for v in row] for row in rounded]


def feedback_row(engine: Engine, feedback_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(feedback).where(feedback.c.id == feedback_id)).one()._mapping)


# ----------------------------------------------------------------------------- drift reports


def drift_report_page(engine: Engine, limit: int, offset: int) -> tuple[list[Row], int]:
    # newest window first: a report caught up after a scheduler outage is written after the day's, of an older window
    query = select(drift_reports).order_by(drift_reports.c.window_end.desc(), drift_reports.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        rows = list(conn.execute(query.offset(offset)))
        total = int(conn.execute(select(func.count()).select_from(drift_reports)).scalar_one())
    return rows, total


def drift_report(engine: Engine, report_id: int) -> Row | None:
    with engine.connect() as conn:
        return conn.execute(select(drift_reports).where(drift_reports.c.id == report_id)).first()


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: replace them by null, recursively (metrics documents may hold them)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


__all__ = [
    "BadCursor",
    "WorkerRow",
    "active_models",
    "coil_detail",
    "coil_page",
    "decision_facts",
    "decode_cursor",
    "drift_report",
    "drift_report_page",
    "encode_cursor",
    "feedback_row",
    "finite",
    "model_versions",
    "workers_seen",
]
