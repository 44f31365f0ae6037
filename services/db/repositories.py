"""SQL implementations of the workflow ports (``workflows/ports.py``), in SQLAlchemy Core.

Core rather than the ORM on the hot path: each batch of AssessCoils is one multi-row ``INSERT … ON
CONFLICT DO NOTHING RETURNING`` for its coils and one ``COPY`` for their votes (PostgreSQL), which is
what lets it write hundreds of coils a second; the conflict clause is what makes a coil id decided
once even when two replicas race for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import numpy as np
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    FromClause,
    Insert,
    Row,
    Select,
    Subquery,
    Table,
    case,
    false,
    func,
    literal,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from ml.ensemble import MemberVote
from ml.matrix import MATRIX_BYTES, SHAPE
from services.db.engine import sqlite_file
from services.db.models import (
    Assessment,
    Coil,
    Feedback,
    Model,
    ModelPerformance,
    RetrainRun,
    ScorePass,
    ScoreReset,
    ScoreTally,
    UtcDateTime,
    as_utc,
    utc_now,
)
from workflows.model_score import ScoreRule
from workflows.ports import (
    NO_ACTIVE_VERSION,
    AssessedCoil,
    ChampionChanged,
    FinishedRun,
    LabelledCoil,
    LatestScore,
    ModelRecord,
    ModelScoreRow,
    RunOvertaken,
    StoredDecision,
    UnknownCoil,
    VersionTaken,
)

log = logging.getLogger(__name__)

coils: Table = Coil.__table__  # type: ignore[assignment]
assessments: Table = Assessment.__table__  # type: ignore[assignment]
models: Table = Model.__table__  # type: ignore[assignment]
feedback: Table = Feedback.__table__  # type: ignore[assignment]
mperformance: Table = ModelPerformance.__table__  # type: ignore[assignment]
score_passes: Table = ScorePass.__table__  # type: ignore[assignment]
score_tallies: Table = ScoreTally.__table__  # type: ignore[assignment]
score_resets: Table = ScoreReset.__table__  # type: ignore[assignment]
VOTE_COLUMNS = ("coil_id", "model_id", "label", "p_nok", "confidence", "created_at")
TALLIES = ("n_coils", "n_correct", "tp", "predicted_nok", "actual_nok")
ANALYZE_AFTER = 10_000  # feedback rows in one ModelScore pass that make its statistics worth refreshing
SCORE_LOCK_NAMESPACE = 0x73636F72  # "scor": one ModelScore pass at a time (pg_advisory_xact_lock)
# How long a ModelScore pass waits for a feedback row another session holds (a hand edit left uncommitted in psql)
# before it gives up, to try again at the next pass; another pass's lock is waited for without this limit.
SCORE_ROW_WAIT_S = 60
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for lock_timeout


def lock_score_tallies(conn: Connection) -> None:
    """Until ``conn``'s transaction ends, no other writer of ``score_tallies`` runs: a ModelScore pass, a reset of
    the tallies, or a promotion that clears them (PostgreSQL's transaction advisory lock; SQLite has one writer
    anyway). The lock is taken before any row lock by every one of them, so they cannot deadlock."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"), {"ns": SCORE_LOCK_NAMESPACE, "key": 0})


# A condition on an alias of ``feedback`` (which rows count).
Counted = Callable[[FromClause], ColumnElement[bool]]


def insert_ignoring_conflicts(engine: Engine, table: Table) -> Insert:
    """``INSERT … ON CONFLICT DO NOTHING`` for the engine's dialect."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def matrix_bytes(matrix: np.ndarray) -> bytes:
    return np.ascontiguousarray(matrix, dtype="<f4").tobytes()


def matrix_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").reshape(SHAPE).astype(np.float32)


def stored_matrix(data: bytes | None) -> np.ndarray | None:
    """A coil's stored readings; None where there are none, or not a whole matrix (a row written by hand, or cut
    short), which AssessCoils would never have written."""
    return matrix_from_bytes(data) if data is not None and len(data) == MATRIX_BYTES else None


def warn_unreadable(coil_ids: Sequence[str], left_out_of: str) -> None:
    """One coil whose stored matrix is not whole must not fail every ReTrain or drift report: it is left out, and
    the log names it, so that someone can mend or delete the row."""
    if coil_ids:
        shown = ", ".join(coil_ids[:5]) + (f" and {len(coil_ids) - 5} more" if len(coil_ids) > 5 else "")
        log.warning(
            "%d coil(s) left out of %s: their stored matrix is not a whole %d×%d float32 matrix (%s)",
            len(coil_ids), left_out_of, *SHAPE, shown,
        )  # fmt: skip


class SqlCoilStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def decided(self, coil_ids: Sequence[str], with_matrix: bool = False) -> dict[str, StoredDecision]:
        """``with_matrix``: also the readings (19 KB a coil), to tell a copy of a coil from another coil under its id;
        the announce pass and the held decisions' retries need only the decisions."""
        if not coil_ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    coils.c.coil_id,
                    coils.c.line,
                    coils.c.status,
                    coils.c.p_nok,
                    coils.c.confidence,
                    coils.c.decided_at,
                    coils.c.received_at,
                    coils.c.published_at,
                    (coils.c.matrix if with_matrix else literal(None)).label("matrix"),
                ).where(coils.c.coil_id.in_(list(coil_ids)), coils.c.status != "pending")
            ).all()
            unpublished = [r.coil_id for r in rows if r.published_at is None]
            votes = self._votes(conn, unpublished) if unpublished else {}
        return {
            r.coil_id: StoredDecision(
                coil_id=r.coil_id,
                line=r.line,
                label=r.status,
                p_nok=r.p_nok,
                confidence=r.confidence,
                decided_at=r.decided_at,
                published=r.published_at is not None,
                votes=votes.get(r.coil_id, ()),
                received_at=r.received_at,
                matrix=stored_matrix(r.matrix),  # None compares with nothing: a copy, not a clash
            )
            for r in rows
        }

    @staticmethod
    def _votes(conn: Any, coil_ids: list[str]) -> dict[str, list[MemberVote]]:
        rows = conn.execute(
            select(
                assessments.c.coil_id,
                models.c.name,
                models.c.version,
                assessments.c.label,
                assessments.c.p_nok,
                assessments.c.confidence,
            )
            .join(models, models.c.id == assessments.c.model_id)
            .where(assessments.c.coil_id.in_(coil_ids))
            .order_by(assessments.c.coil_id, models.c.name)
        ).all()
        out: dict[str, list[MemberVote]] = defaultdict(list)
        for r in rows:
            out[r.coil_id].append(MemberVote(r.name, r.version, r.label, r.p_nok, r.confidence))
        return out

    def save_assessed(
        self,
        batch: Sequence[AssessedCoil],
        model_ids: dict[tuple[str, int], int],
        published: Sequence[str] = (),
    ) -> set[str]:
        if not batch:
            self.mark_published(published)
            return set()
        coil_rows = [
            {
                "coil_id": c.coil_id,
                "line": c.line,
                "produced_at": c.produced_at,
                "received_at": c.received_at,
                "status": c.label,
                "p_nok": c.p_nok,
                "confidence": c.confidence,
                "decided_at": c.decided_at,
                "matrix": matrix_bytes(c.matrix),
                "product": c.product,
            }
            for c in batch
        ]
        with self.engine.begin() as conn:
            inserted = {
                row.coil_id
                for row in conn.execute(
                    insert_ignoring_conflicts(self.engine, coils).returning(coils.c.coil_id), coil_rows
                )
            }
            vote_rows = [
                (c.coil_id, model_ids[(v.model, v.version)], v.label, v.p_nok, v.confidence, as_utc(c.decided_at))
                for c in batch
                if c.coil_id in inserted
                for v in c.votes
            ]
            if vote_rows:
                _insert_rows(conn, assessments, VOTE_COLUMNS, vote_rows)
            _mark_published(conn, published)
        return inserted

    def mark_published(self, coil_ids: Sequence[str]) -> None:
        if coil_ids:
            with self.engine.begin() as conn:
                _mark_published(conn, coil_ids)

    def unannounced(self, window: UnannouncedWindow) -> list[tuple[str, datetime]]:
        """``(coil_id, decided_at)`` of the decisions in ``window`` that never reached the broker, oldest first."""
        with self.engine.connect() as conn:
            return [(r.coil_id, r.decided_at) for r in conn.execute(window.query())]

    def count_unannounced(self, decided_before: datetime, since: datetime | None = None) -> tuple[int, int]:
        """How many decisions stored before ``decided_before`` never reached the broker, and how many of them
        are older than ``since`` (through the same partial index)."""
        older = coils.c.decided_at < since if since is not None else false()
        query = select(func.count(), func.coalesce(func.sum(case((older, 1), else_=0)), 0)).where(
            coils.c.published_at.is_(None), coils.c.decided_at < decided_before
        )
        with self.engine.connect() as conn:
            total, old = conn.execute(query).one()
        return int(total), int(old)


@dataclass(frozen=True)
class UnannouncedWindow:
    """Which stored decisions that never reached the broker to read: decided before ``decided_before`` (and at
    ``since`` or later), at most ``limit``, of ``line`` only when given, after the key ``after`` (``decided_at``,
    ``coil_id``: the next page), none of ``skip_lines``."""

    decided_before: datetime
    limit: int
    line: str | None = None
    after: tuple[datetime, str] | None = None
    since: datetime | None = None
    skip_lines: frozenset[str] = frozenset()

    def query(self) -> Select:
        """Read through ``ix_coils_unannounced``, which holds only the unpublished rows: cheap enough for the
        scheduler's pass every few minutes, whatever the table's history."""
        query = (
            select(coils.c.coil_id, coils.c.decided_at)
            .where(
                coils.c.published_at.is_(None), coils.c.decided_at < self.decided_before, coils.c.status != "pending"
            )
            .order_by(coils.c.decided_at, coils.c.coil_id)
            .limit(self.limit)
        )
        if self.line is not None:
            query = query.where(coils.c.line == self.line)
        if self.after is not None:
            query = query.where(tuple_(coils.c.decided_at, coils.c.coil_id) > tuple_(*self.after))
        if self.since is not None:
            query = query.where(coils.c.decided_at >= self.since)
        if self.skip_lines:
            query = query.where(coils.c.line.not_in(sorted(self.skip_lines)))
        return query


def _insert_rows(conn: Connection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Plain rows that cannot conflict (a batch's votes), by ``COPY`` on PostgreSQL.

    An ``executemany`` there runs one ``INSERT`` per row (psycopg's pipeline): four votes a coil made
    the votes the costliest part of the write, for the server and for this process alike (measured in
    docs/benchmarks.md). ``COPY`` streams them in one statement, in the caller's transaction, on its
    connection. No SQLAlchemy type sees the values: they must be what the columns hold (timestamps
    through :func:`as_utc`). A driver error comes out as SQLAlchemy's, as from ``conn.execute``, so that
    callers tell an outage (``OperationalError``, the connection invalidated) from a refused row. Other
    drivers (SQLite) take the ``executemany``."""
    if conn.dialect.driver != "psycopg":  # SQLite, or a PostgreSQL driver without psycopg 3's copy API
        conn.execute(table.insert(), [dict(zip(columns, row, strict=True)) for row in rows])
        return
    statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None  # checked out for the caller's transaction
    driver_error = conn.dialect.loaded_dbapi.Error
    try:
        with dbapi_connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    except driver_error as exc:
        # less than SQLAlchemy's own handler does: no handle_error events (none are registered) and only this
        # connection invalidated, not the pool; pool_pre_ping finds any other that the outage broke
        lost = conn.dialect.is_disconnect(exc, dbapi_connection, None)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, driver_error, connection_invalidated=lost, dialect=conn.dialect
        ) from exc


def _mark_published(conn: Connection, coil_ids: Sequence[str]) -> None:
    if coil_ids:
        conn.execute(
            update(coils)
            .where(coils.c.coil_id.in_(list(coil_ids)), coils.c.published_at.is_(None))
            .values(published_at=datetime.now(UTC))
        )


def _record(row: Any) -> ModelRecord:
    return ModelRecord(
        id=row.id,
        name=row.name,
        kind=row.kind,
        version=row.version,
        status=row.status,
        artifact_uri=row.artifact_uri or "",
        sha256=row.sha256 or "",
        metrics=row.metrics or {},
        created_at=row.created_at,
        promoted_at=row.promoted_at,
    )


class SqlModelRegistry:
    """The ``models`` table: versions, their artifacts and who is serving."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def active_models(self) -> list[ModelRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(models).where(models.c.status == "active").order_by(models.c.name)).all()
        return [_record(r) for r in rows]

    def get(self, model_id: int) -> ModelRecord:
        with self.engine.connect() as conn:
            row = conn.execute(select(models).where(models.c.id == model_id)).one()
        return _record(row)

    def all(self, names: Iterable[str] | None = None) -> list[ModelRecord]:
        query = select(models).order_by(models.c.name, models.c.version)
        if names is not None:
            query = query.where(models.c.name.in_(list(names)))
        with self.engine.connect() as conn:
            return [_record(r) for r in conn.execute(query).all()]

    def next_version(self, name: str) -> int:
        with self.engine.connect() as conn:
            current = conn.execute(select(func.max(models.c.version)).where(models.c.name == name)).scalar()
        return int(current or 0) + 1

    def add(
        self,
        *,
        name: str,
        kind: str,
        version: int,
        artifact_uri: str,
        sha256: str,
        metrics: dict[str, Any] | None = None,
        status: str = "candidate",
        parent_id: int | None = None,
    ) -> ModelRecord:
        try:
            with self.engine.begin() as conn:
                model_id = conn.execute(
                    models.insert()
                    .values(
                        name=name,
                        kind=kind,
                        version=version,
                        status="candidate",
                        artifact_uri=artifact_uri,
                        sha256=sha256,
                        metrics=metrics or {},
                        parent_id=parent_id,
                    )
                    .returning(models.c.id)
                ).scalar_one()
        except IntegrityError:
            with self.engine.connect() as conn:
                taken = conn.execute(
                    select(models.c.id).where(models.c.name == name, models.c.version == version)
                ).first()
            if taken is None:
                raise
            raise VersionTaken(f"{name} v{version} was registered by another process meanwhile") from None
        if status == "active":
            self.promote(model_id)
        elif status != "candidate":
            self.set_status(model_id, status)
        return self.get(model_id)

    def promote(self, model_id: int, replacing: int | None = None) -> ModelRecord | None:
        """In one transaction: retire the name's active version (if any) and activate ``model_id``.

        Returns the retired champion. With ``replacing`` (ReTrain's champion), nothing changes unless that is
        still the active version: the check and the change share the transaction, and the partial unique index
        on active versions makes a concurrent double promotion fail instead of leaving two versions serving.
        """
        now = datetime.now(UTC)
        try:
            with self.engine.begin() as conn:
                # First, before any row lock: a ModelScore pass running now computed its differences under the old
                # promoted_at and would add them back after the tallies are cleared below.
                lock_score_tallies(conn)
                name = conn.execute(select(models.c.name).where(models.c.id == model_id)).scalar_one()
                champion = conn.execute(
                    select(models).where(models.c.name == name, models.c.status == "active", models.c.id != model_id)
                ).first()
                current = champion.id if champion is not None else NO_ACTIVE_VERSION
                if replacing is not None and current != replacing:
                    now_active = f"v{champion.version} is active now" if champion is not None else "none is active"
                    if replacing == NO_ACTIVE_VERSION:
                        raise ChampionChanged(f"{name} had no active version, but {now_active}")
                    expected = conn.execute(select(models.c.version).where(models.c.id == replacing)).scalar_one()
                    raise ChampionChanged(f"{name} v{expected} was to be replaced, but {now_active}")
                if champion is not None:
                    conn.execute(
                        update(models).where(models.c.id == champion.id).values(status="retired", retired_at=now)
                    )
                conn.execute(
                    update(models)
                    .where(models.c.id == model_id)
                    .values(status="active", promoted_at=now, retired_at=None)  # a version put back in service
                )
                # The scoring window starts again at promotion (a version put back in service included).
                conn.execute(score_tallies.delete().where(score_tallies.c.model_id == model_id))
        except IntegrityError:  # the partial unique index: another promotion of this name committed meanwhile
            raise ChampionChanged("another version of this name was put in service at the same time") from None
        return _record(champion) if champion is not None else None

    def set_status(self, model_id: int, status: str, *, was: str | None = None) -> bool:
        values: dict[str, Any] = {"status": status}
        if status == "retired":
            values["retired_at"] = datetime.now(UTC)
        query = update(models).where(models.c.id == model_id)
        if was is not None:
            query = query.where(models.c.status == was)
        with self.engine.begin() as conn:
            return conn.execute(query.values(**values)).rowcount == 1


# ----------------------------------------------------------------------------- human in the loop

retrain_runs: Table = RetrainRun.__table__  # type: ignore[assignment]


def latest_feedback(engine: Engine | None = None, *, among: Counted | None = None, name: str = "latest") -> Subquery:
    """(coil_id, label, created_at) of the newest feedback row per coil: the operator's last word wins.

    Written as "no newer row for the same coil" rather than DISTINCT ON or a window: PostgreSQL runs
    that as a parallel hash anti-join and then a parallel hash join with the votes, where a sorted
    DISTINCT ON was computed once per parallel worker (ModelScore on 1 M rows: 3.7 s → 2.3 s).
    ``among`` restricts which rows count at all (ModelScore's passes: the rows counted so far), on
    both sides of the comparison. ``engine`` is accepted for callers that pass it; the query is the
    same on every dialect.
    """
    row, newer = feedback.alias("f"), feedback.alias("newer")
    superseded = (
        select(newer.c.id)
        .where(
            newer.c.coil_id == row.c.coil_id,
            (newer.c.created_at > row.c.created_at)
            | ((newer.c.created_at == row.c.created_at) & (newer.c.id > row.c.id)),
            *([among(newer)] if among else []),
        )
        .exists()
    )
    return (
        select(row.c.coil_id, row.c.label, row.c.created_at)
        .where(~superseded, *([among(row)] if among else []))
        .subquery(name)
    )


class SqlFeedbackStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, coil_id: str, label: str, operator: str | None, comment: str | None = None) -> int:
        if label not in ("OK", "NOK"):
            raise ValueError(f"label must be OK or NOK, got {label!r}")
        with self.engine.begin() as conn:
            if conn.execute(select(coils.c.coil_id).where(coils.c.coil_id == coil_id)).first() is None:
                raise UnknownCoil(f"no coil {coil_id!r} has been assessed")
            return int(
                conn.execute(
                    feedback.insert()
                    .values(coil_id=coil_id, label=label, operator=operator, comment=comment)
                    .returning(feedback.c.id)
                ).scalar_one()
            )

    def labelled_coils(self) -> list[LabelledCoil]:
        """Streamed from the server a few hundred rows at a time: a client-side result held every matrix twice,
        as bytes and as arrays, until the last row (6.3 GB at 100,000 labelled coils; docs/benchmarks.md)."""
        latest = latest_feedback(self.engine)
        query = (
            select(coils.c.coil_id, coils.c.matrix, coils.c.produced_at, latest.c.label, latest.c.created_at)
            .join(latest, latest.c.coil_id == coils.c.coil_id)
            .order_by(latest.c.created_at, coils.c.coil_id)
        )
        labelled: list[LabelledCoil] = []
        unreadable: list[str] = []
        with self.engine.connect() as conn:
            for r in conn.execution_options(stream_results=True, yield_per=500).execute(query):
                if (matrix := stored_matrix(r.matrix)) is None:
                    unreadable.append(r.coil_id)
                else:
                    labelled.append(LabelledCoil(r.coil_id, matrix, int(r.label == "NOK"), r.produced_at, r.created_at))
        warn_unreadable(unreadable, "ReTrain's labelled coils")
        return labelled


class SqlScoreStore:
    """ModelScore's counting. Since promotion (the default window) it is incremental.

    A pass, under a lock so that two schedulers never count the same rows: opens a ``score_passes``
    row and stamps every feedback row no pass has counted with its id; then, for the coils those rows
    touch, compares the operators' latest counted word after the pass with the one before it, over
    every vote cast since its model's promotion, and adds the per-model differences to
    ``score_tallies``. A correction (a newer row for a coil) takes the old word's contribution out and
    puts the new one in. The cost follows the feedback that is new, not the size of the tables
    (1 M rows: about 2 s to recount, milliseconds for a pass). A rolling window is recounted every run,
    because votes leave it as time passes. :meth:`recount` is the definition the tallies must equal.

    Counted rows edited or deleted afterwards (by hand, or with their coil) leave a ``score_resets`` row
    (services/db/feedback_edits.py); the next pass then starts the tallies again and counts every row.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def agreement(self, now: datetime, window: timedelta | None) -> list[ModelScoreRow]:
        if window is not None:
            return self.recount(now, window)
        self.count_new_feedback()
        return self.tallied(now)

    def count_new_feedback(self) -> int:
        """One pass: add the feedback rows no pass has counted to the tallies; returns how many it counted (every
        row, when counted feedback was edited or deleted since the last pass)."""
        with self.engine.begin() as conn, _row_wait_bounded(conn):
            self._lock(conn)
            # On SQLite this INSERT takes the write lock: a second pass waits for this one to commit.
            pass_id = conn.execute(score_passes.insert().values(n_feedback=0).returning(score_passes.c.id)).scalar_one()
            claim = update(feedback).values(score_pass=pass_id)
            if not self._reset(conn, pass_id):
                claim = claim.where(feedback.c.score_pass.is_(None))
            claimed = conn.execute(claim).rowcount
            if not claimed:
                conn.execute(score_passes.delete().where(score_passes.c.id == pass_id))
                return 0
            if claimed >= ANALYZE_AFTER and self.engine.dialect.name == "postgresql":
                # The planner's statistics still say these rows are uncounted; believing that, it drives
                # the "no newer counted row" check from the score_pass index and the pass turns
                # quadratic (a 1 M-row first pass ran for minutes). ANALYZE in this transaction sees the
                # pass's own updates.
                # ANALYZE waits for a running VACUUM (autovacuum's anti-wraparound one is never cancelled): that is
                # no row an edit holds, and not what the pass's row-lock limit is for
                conn.execute(text("SET LOCAL lock_timeout = 0"))
                conn.execute(text("ANALYZE feedback"))
                conn.execute(text(f"SET LOCAL lock_timeout = '{SCORE_ROW_WAIT_S}s'"))
            deltas = conn.execute(_tally_deltas(pass_id)).mappings().all()
            if deltas:
                conn.execute(_add_to_tallies(self.engine), [dict(d) for d in deltas])
            conn.execute(update(score_passes).where(score_passes.c.id == pass_id).values(n_feedback=claimed))
        return claimed

    def forget_tallies(self) -> None:
        """Start counting afresh: the next pass counts every feedback row again (``coilguard score --recount``).
        The triggers do the same for counted rows edited or deleted; this is for whatever they cannot see."""
        with self.engine.begin() as conn:
            conn.execute(score_resets.insert().values(cause="recount requested"))

    @staticmethod
    def _reset(conn: Connection, pass_id: int) -> bool:
        """Whether a reset is waiting; if so, the tallies and the earlier passes are gone and pass ``pass_id``
        counts every row (its "before" is then empty). Only the marks seen here are taken: one written while
        this pass runs waits for the next."""
        marks = conn.execute(select(score_resets).order_by(score_resets.c.id)).all()  # a row or two: see the triggers
        if not marks:
            return False
        first = marks[0]
        log.warning(
            "ModelScore: counted feedback was changed (%s at %s): counting all feedback again", first.cause, first.at
        )
        conn.execute(score_resets.delete().where(score_resets.c.id <= marks[-1].id))
        conn.execute(score_tallies.delete())
        conn.execute(score_passes.delete().where(score_passes.c.id != pass_id))
        return True

    def _lock(self, conn: Connection) -> None:
        """One pass (or reset) at a time on PostgreSQL, until the transaction ends; SQLite has one writer anyway.
        Then the pass's own waits for row locks are bounded (:func:`_row_wait_bounded`)."""
        lock_score_tallies(conn)
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"SET LOCAL lock_timeout = '{SCORE_ROW_WAIT_S}s'"))

    def tallied(self, now: datetime) -> list[ModelScoreRow]:
        """The active versions' tallies as they stand (no pass is run)."""
        query = (
            select(models.c.id, models.c.name, models.c.version, models.c.promoted_at, score_tallies)
            .outerjoin(score_tallies, score_tallies.c.model_id == models.c.id)
            .where(models.c.status == "active")
            .order_by(models.c.name)
        )
        with self.engine.connect() as conn:
            return [_score_row(r, r.promoted_at, now) for r in conn.execute(query)]

    def recount(self, now: datetime, window: timedelta | None = None) -> list[ModelScoreRow]:
        """Every vote joined with every latest feedback row: the definition the tallies must equal.

        A rolling window never reaches back before the version's promotion: a version put back in service (a
        rollback) would otherwise be judged again on the votes that had it replaced."""
        latest = latest_feedback(self.engine)
        start: ColumnElement[Any] = models.c.promoted_at
        if window is not None:
            since = literal(now - window, UtcDateTime())
            start = case((models.c.promoted_at > since, models.c.promoted_at), else_=since)
        counts = (
            select(assessments.c.model_id, *[c.label(k) for k, c in _vote_counts(latest).items()])
            .join(latest, latest.c.coil_id == assessments.c.coil_id)
            .join(models, models.c.id == assessments.c.model_id)
            .where(
                models.c.status == "active",
                assessments.c.label != "ABSTAIN",
                (assessments.c.created_at >= start) | start.is_(None),
                assessments.c.created_at <= now,
            )
            .group_by(assessments.c.model_id)
        ).subquery("counts")
        query = (
            select(models.c.id, models.c.name, models.c.version, models.c.promoted_at, counts)
            .outerjoin(counts, counts.c.model_id == models.c.id)
            .where(models.c.status == "active")
            .order_by(models.c.name)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_score_row(r, _window_start(r.promoted_at, now, window), now) for r in rows]

    def record(self, rows: Sequence[ModelScoreRow], below: Sequence[bool], computed_at: datetime) -> None:
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(
                mperformance.insert(),
                [
                    {
                        "model_id": r.model_id,
                        "computed_at": computed_at,
                        "window_start": r.window_start,
                        "window_end": r.window_end,
                        "n_coils": r.n_coils,
                        "n_correct": r.n_correct,
                        "score": r.score,
                        "precision_nok": r.precision_nok,
                        "recall_nok": r.recall_nok,
                        "below_threshold": flag,
                    }
                    for r, flag in zip(rows, below, strict=True)
                ],
            )

    def below_since(self, model_ids: Sequence[int], rule: ScoreRule) -> dict[int, datetime]:
        """For each of these versions, when its present unbroken run of scores that break ``rule`` began, within its
        present time in service (today's rule, not the ``below_threshold`` each row was stored with: a rule made
        stricter would otherwise start the count again); a version whose latest score keeps the rule is left out.
        Index lookups on the version's rows. The SQL form of :meth:`ScoreRule.below`."""
        below = (mperformance.c.n_coils > rule.min_coils) & (mperformance.c.score < rule.threshold)
        kept_rule = ~below | mperformance.c.score.is_(None)
        since: dict[int, datetime] = {}
        with self.engine.connect() as conn:
            for model_id in model_ids:
                promoted_at = conn.execute(select(models.c.promoted_at).where(models.c.id == model_id)).scalar()
                served = [mperformance.c.model_id == model_id]
                if promoted_at is not None:  # a version put back in service: not the rows that had it replaced
                    served.append(mperformance.c.computed_at >= promoted_at)
                kept = conn.execute(select(func.max(mperformance.c.computed_at)).where(*served, kept_rule)).scalar_one()
                began = conn.execute(
                    select(func.min(mperformance.c.computed_at)).where(
                        *served, below, *([mperformance.c.computed_at > kept] if kept is not None else [])
                    )
                ).scalar_one()
                if began is not None:
                    since[model_id] = began
        return since

    def latest(self) -> list[LatestScore]:
        newest = newest_scores()
        query = (
            select(models, mperformance.c.n_coils, mperformance.c.score, mperformance.c.computed_at)
            .join(mperformance, mperformance.c.model_id == models.c.id)
            .join(newest, newest.c.id == mperformance.c.id)
            .where(models.c.status == "active")
            .order_by(models.c.name)
        )
        with self.engine.connect() as conn:
            return [LatestScore(_record(r), r.n_coils, r.score, r.computed_at) for r in conn.execute(query)]


class ScorePassBlocked(RuntimeError):
    """A ModelScore pass gave up waiting for a row another session holds; the next pass tries again."""


@contextlib.contextmanager
def _row_wait_bounded(conn: Connection) -> Iterator[None]:
    """A pass that waited its limit for a row lock fails with what to look for, not with the driver's bare
    "canceling statement due to lock timeout"."""
    try:
        yield
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        raise ScorePassBlocked(
            f"ModelScore waited more than {SCORE_ROW_WAIT_S} s for a feedback row another session holds (an edit "
            "left uncommitted? see pg_stat_activity's 'idle in transaction'); the next pass tries again"
        ) from exc


def _vote_counts(word: Subquery) -> dict[str, ColumnElement[Any]]:
    """The tallies of votes against the operators' word; a vote on a coil without a word counts nowhere."""
    said_nok = assessments.c.label == "NOK"
    is_nok = word.c.label == "NOK"
    has_word = word.c.label.is_not(None)

    def n(condition: ColumnElement[bool]) -> ColumnElement[Any]:
        return func.sum(case((condition, 1), else_=0))

    return {
        "n_coils": n(has_word),
        "n_correct": n(assessments.c.label == word.c.label),
        "tp": n(said_nok & is_nok),
        "predicted_nok": n(said_nok & has_word),
        "actual_nok": n(is_nok),
    }


def _tally_deltas(pass_id: int) -> Select[Any]:
    """Per model: its counts against the latest counted word after pass ``pass_id`` minus before it.

    Only the coils that the pass's feedback rows touch can change, so only their votes are read.
    """
    touched = select(feedback.c.coil_id).where(feedback.c.score_pass == pass_id).distinct()
    after = latest_feedback(among=lambda f: f.c.score_pass <= pass_id, name="after")
    before = latest_feedback(among=lambda f: f.c.score_pass < pass_id, name="before")
    new, old = _vote_counts(after), _vote_counts(before)
    return (
        select(assessments.c.model_id, *[(new[k] - old[k]).label(k) for k in new])
        .join(after, after.c.coil_id == assessments.c.coil_id)
        .outerjoin(before, before.c.coil_id == assessments.c.coil_id)
        .join(models, models.c.id == assessments.c.model_id)
        .where(
            assessments.c.coil_id.in_(touched),
            assessments.c.label != "ABSTAIN",
            models.c.promoted_at.is_(None) | (assessments.c.created_at >= models.c.promoted_at),
        )
        .group_by(assessments.c.model_id)
    )


def _add_to_tallies(engine: Engine) -> Insert:
    """Upsert adding a pass's differences to each model's tally (one statement for all models)."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(score_tallies)
    added: dict[str, Any] = {k: score_tallies.c[k] + stmt.excluded[k] for k in TALLIES}
    added["updated_at"] = utc_now()
    return stmt.on_conflict_do_update(index_elements=[score_tallies.c.model_id], set_=added)


def newest_scores() -> Subquery:
    """Each version's newest ``mperformance`` row (``model_id``, ``id``) from its present time in service (its last,
    for a retired one). A version put back in service has no score until ModelScore's next pass: the row from
    before it was retired, the score that had it replaced, would have ReTrain undo the rollback."""
    return (
        select(mperformance.c.model_id, func.max(mperformance.c.id).label("id"))
        .join(models, models.c.id == mperformance.c.model_id)
        .where(models.c.promoted_at.is_(None) | (mperformance.c.computed_at >= models.c.promoted_at))
        .group_by(mperformance.c.model_id)
        .subquery("newest")
    )


def _window_start(promoted_at: datetime | None, now: datetime, window: timedelta | None) -> datetime | None:
    if window is None:
        return promoted_at
    return max(now - window, promoted_at) if promoted_at is not None else now - window


def _score_row(r: Row[Any], window_start: datetime | None, now: datetime) -> ModelScoreRow:
    return ModelScoreRow(
        model_id=r.id,
        name=r.name,
        version=r.version,
        window_start=window_start,
        window_end=now,
        **{k: int(getattr(r, k) or 0) for k in TALLIES},
    )


RETRAIN_LOCK_NAMESPACE = 0x636F696C  # "coil": keeps coilguard's advisory locks apart from other users'
ANNOUNCE_LOCK_NAMESPACE = 0x636F6961  # "coia": one `coilguard announce` at a time
JUDGED = ("rejected", "promoted")  # the runs that judged a challenger (a failed one judged nothing)


class SqlRetrainRuns:
    """``retrain_runs`` rows plus the lock that makes one retrain per model at a time.

    On PostgreSQL the lock is a session advisory lock on the model id, taken *before* the ``running``
    row is written and held on its own connection until the run ends. A process that dies loses its
    connection and with it the lock, so the next run can tell a dead run from a live one: if it gets
    the lock while a ``running`` row exists, that row's process is gone and the row is marked failed.
    On a SQLite file the lock is an ``flock`` on a file beside the database, which the system drops
    when the process dies, however it dies (a pid, which a restarted container or a reboot hands on,
    could not say that). A database without a file path (in memory, or a ``file:`` URI) checks the row's
    ``host:pid`` instead.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._locks: dict[int, Connection | _FileLock] = {}

    def _try_lock(self, model_id: int) -> tuple[bool, Connection | _FileLock | None]:
        """Whether no live process retrains ``model_id`` as far as the lock can tell, and the lock (None for a
        SQLite database without a file, which has none: the row's ``host:pid`` is checked instead)."""
        return try_lock(self.engine, RETRAIN_LOCK_NAMESPACE, model_id, f"retrain-{model_id}")

    def start(
        self,
        model_id: int,
        reason: str,
        worker: str,
        *,
        require_active: bool = False,
        judged_since: int | None = None,
    ) -> int | None:
        got, lock = self._try_lock(model_id)
        if not got:
            return None
        try:
            with self.engine.begin() as conn:
                stale = conn.execute(
                    select(retrain_runs).where(retrain_runs.c.model_id == model_id, retrain_runs.c.status == "running")
                ).first()
                if stale is not None:
                    if lock is None and _process_alive(stale.worker):
                        return None
                    _settle_dead_run(conn, stale)
                _check_not_overtaken(conn, model_id, require_active, judged_since)
                run_id = conn.execute(
                    retrain_runs.insert()
                    .values(
                        model_id=model_id, status="running", reason=reason, worker=worker, started_at=datetime.now(UTC)
                    )
                    .returning(retrain_runs.c.id)
                ).scalar_one()
        except IntegrityError:  # another process wrote its running row first (SQLite)
            release_lock(lock)
            return None
        except BaseException:
            release_lock(lock)
            raise
        if lock is not None:
            self._locks[run_id] = lock
        return int(run_id)

    def finish(
        self,
        run_id: int,
        status: str,
        *,
        reason: str | None = None,
        challenger_id: int | None = None,
        metrics: dict[str, Any] | None = None,
        device: str | None = None,
    ) -> None:
        values: dict[str, Any] = {"status": status, "finished_at": datetime.now(UTC)}
        if reason is not None:
            values["reason"] = reason
        if challenger_id is not None:
            values["challenger_id"] = challenger_id
        if metrics is not None:
            values["metrics"] = metrics
        if device is not None:
            values["device"] = device
        try:
            with self.engine.begin() as conn:
                conn.execute(update(retrain_runs).where(retrain_runs.c.id == run_id).values(**values))
        finally:
            release_lock(self._locks.pop(run_id, None))

    def settle_abandoned(self) -> int:
        """Close the ``running`` rows of every model whose process has died; how many.

        :meth:`start` does it for the model it starts, but a run killed just after its promotion committed
        belongs to a version that is retired now and never retrained again: without this its row would say
        ``running`` for ever, and never that it promoted."""
        with self.engine.connect() as conn:
            stale = conn.execute(select(retrain_runs).where(retrain_runs.c.status == "running")).all()
        settled = 0
        for row in stale:
            got, lock = self._try_lock(row.model_id)
            if not got:
                continue
            try:
                if lock is None and _process_alive(row.worker):
                    continue
                with self.engine.begin() as conn:
                    settled += _settle_dead_run(conn, row)
            finally:
                release_lock(lock)
        return settled

    def last_judged(self, model_id: int) -> FinishedRun | None:
        query = (
            select(retrain_runs.c.id, retrain_runs.c.status, retrain_runs.c.finished_at, retrain_runs.c.metrics)
            .where(
                retrain_runs.c.model_id == model_id,
                retrain_runs.c.finished_at.is_not(None),
                retrain_runs.c.status.in_(JUDGED),
            )
            .order_by(retrain_runs.c.finished_at.desc(), retrain_runs.c.id.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else FinishedRun(row.id, row.status, as_utc(row.finished_at), row.metrics or {})


def _check_not_overtaken(conn: Connection, model_id: int, require_active: bool, judged_since: int | None) -> None:
    """:meth:`SqlRetrainRuns.start`'s checks, under its lock: the facts a pass decided on, read again."""
    if require_active:
        row = conn.execute(select(models.c.version, models.c.status).where(models.c.id == model_id)).one()
        if row.status != "active":
            raise RunOvertaken(f"v{row.version} is no longer the active version ({row.status} since this pass looked)")
    if judged_since is not None:
        judged = conn.execute(
            select(retrain_runs.c.id, retrain_runs.c.status, retrain_runs.c.worker)
            .where(
                retrain_runs.c.model_id == model_id,
                retrain_runs.c.id > judged_since,
                retrain_runs.c.status.in_(JUDGED),
            )
            .order_by(retrain_runs.c.id.desc())
            .limit(1)
        ).first()
        if judged is not None:
            raise RunOvertaken(
                f"run {judged.id} by {judged.worker} ended {judged.status} since this pass looked; its verdict stands"
            )


def _settle_dead_run(conn: Connection, run: Row[Any]) -> int:
    """Close the ``running`` row of a process that died, as what it did: ``promoted`` when a version it trained
    (a child of its model, registered and promoted since the run began: an older child put back in service by
    hand meanwhile is not the run's) went into service, otherwise ``failed``."""
    challenger = conn.execute(
        select(models.c.id, models.c.version)
        .where(
            models.c.parent_id == run.model_id,
            models.c.created_at >= run.started_at,
            models.c.promoted_at >= run.started_at,
        )
        .order_by(models.c.promoted_at)
        .limit(1)
    ).first()
    died = f"its process ({run.worker}) died"
    values: dict[str, Any] = {"status": "failed", "finished_at": datetime.now(UTC)}
    if challenger is not None:
        values.update(
            status="promoted", challenger_id=challenger.id, reason=f"v{challenger.version} promoted, then {died}"
        )
    else:
        values["reason"] = f"{run.reason or ''} | abandoned: {died}".strip(" |")
    return conn.execute(
        update(retrain_runs).where(retrain_runs.c.id == run.id, retrain_runs.c.status == "running").values(**values)
    ).rowcount


class _FileLock:
    """An exclusive ``flock`` on a file: held while the file stays open in this process, dropped by the system
    when the process ends."""

    def __init__(self, file: IO[str]) -> None:
        self._file = file

    @classmethod
    def take(cls, path: Path) -> _FileLock | None:
        """The lock, or None when another run holds it (this process's included, as the advisory lock does)."""
        import fcntl  # POSIX only, as coilguard's deployments are

        file = open(path, "a")  # noqa: SIM115 (it stays open as long as the lock is held)
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return None
        return cls(file)

    def release(self) -> None:
        self._file.close()  # closing the only descriptor of the open file drops its flock


def try_lock(engine: Engine, namespace: int, key: int, name: str) -> tuple[bool, Connection | _FileLock | None]:
    """A lock between processes that the system drops when its holder dies: a session advisory lock on
    PostgreSQL (held by the connection returned), an ``flock`` on ``<database>.<name>.lock`` beside a SQLite
    file. (False, None) when another process holds it; (True, None) where there is nothing to lock with (a
    database in memory). Give it back with :func:`release_lock`."""
    if engine.dialect.name == "postgresql":
        conn = engine.connect()
        got = conn.execute(text("SELECT pg_try_advisory_lock(:ns, :key)"), {"ns": namespace, "key": key}).scalar()
        conn.commit()
        if not got:
            conn.close()
            return False, None
        return True, conn
    if (database := sqlite_file(engine.url.database)) is not None:
        lock = _FileLock.take(database.with_name(f"{database.name}.{name}.lock"))
        return lock is not None, lock
    return True, None


def release_lock(lock: Connection | _FileLock | None) -> None:
    """Unlock, then end the lock's session. ``close()`` alone would hand the connection back to the pool
    with the lock still held, and every later run of that model would be "already running" until the pool
    happened to drop it. Ending the session alone is not enough either: the server frees a session's locks
    only once its backend has exited, a moment after the client hung up, so a run started at once by another
    process could still find the lock taken. The explicit unlock is answered before this returns."""
    if lock is None:
        return
    if isinstance(lock, _FileLock):
        lock.release()
        return
    try:
        with contextlib.suppress(SQLAlchemyError):  # a broken connection: its session ends with it anyway
            lock.execute(text("SELECT pg_advisory_unlock_all()"))
            lock.commit()
    finally:
        lock.invalidate()
        lock.close()


def _process_alive(worker: str | None) -> bool:
    """For SQLite: is the ``host:pid`` that wrote a running row still alive? Unknown hosts count as alive."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
