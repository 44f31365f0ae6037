"""Drift reports wired to PostgreSQL and the model and report stores: what ``coilguard drift``, the
scheduler's daily job and ``coilguard up`` run.

The reference is the training data that the active models' manifests name (kept under
``MODEL_DIR/data`` by ``register``); the serving ensemble's ``p_nok`` on it is computed once per set
of active versions and cached beside the reports. Reports go to ``REPORT_DIR/drift/`` (HTML and JSON)
with one ``drift_reports`` row each, whose ``report_uri`` is relative to ``REPORT_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, select, update

from ml.assessors.base import AssessBatch
from ml.assessors.manifest import Manifest, code_version
from ml.dataset import CoilDataset
from ml.drift_compare import CoilSample, DriftConfig, DriftResult
from ml.durable import write_atomic
from services.config import Settings
from services.db.engine import engine_for
from services.db.models import Coil, DriftReport
from services.db.repositories import SqlModelRegistry, latest_feedback, stored_matrix, warn_unreadable
from services.metrics import METRICS
from workflows.assess import EnsembleLoader
from workflows.drift_report import DriftOutcome, run_drift_report
from workflows.ports import ModelRecord
from workflows.training import load_kept_data, resolve_artifact

log = logging.getLogger(__name__)

DRIFT_DIR = "drift"
PREDICT_CHUNK = 64
READ_CHUNK = 500  # coils read from the database at a time

coils = Coil.__table__
drift_reports = DriftReport.__table__


def drift_config(settings: Settings) -> DriftConfig:
    return DriftConfig(drift_share=settings.drift_share, min_coils=settings.drift_min_coils)


class SqlDriftSource:
    """Reference from the active models' kept training data; current coils from the ``coils`` table."""

    def __init__(self, engine: Engine, model_dir: Path, cache_dir: Path, config: DriftConfig) -> None:
        self.engine = engine
        self.model_dir = Path(model_dir)
        self.cache_dir = Path(cache_dir)
        self.config = config
        self.registry = SqlModelRegistry(engine)

    def reference(self) -> CoilSample | None:
        records = self.registry.active_models()
        paths = sorted({p for p in (self._data_path(r) for r in records) if p is not None})
        if not paths:
            return None
        X, y, n_coils = self._draw(paths)
        description = {"models": [{"name": r.name, "version": r.version} for r in records], "data": paths}
        sample = CoilSample(X, labels=np.where(y == 1, "NOK", "OK").astype(object), description=description)
        sample.description.update({"n_coils": n_coils, **({"sampled_from": n_coils} if len(X) < n_coils else {})})
        sample.p_nok, sample.description["predictions"] = self._predictions(records, paths, sample)
        return sample

    def _draw(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """``max_reference`` of the coils in the kept training sets, each coil once (ReTrain keeps an operator's
        coil three times over, and models may share data), drawn as ``CoilSample.sample`` draws; and how many
        coils there were.

        One file in memory at a time, each read twice when there is more than one: a year of weekly ReTrains
        grows each model's history, and the four histories together would not fit beside the report."""
        seen: set[str] = set()
        firsts: list[np.ndarray] = []  # per file, the rows whose coil no earlier row had
        kept: CoilDataset | None = None
        for path in paths:
            kept = load_kept_data(self.model_dir, path)
            _, first = np.unique(kept.coil_id, return_index=True)
            rows = np.array([i for i in np.sort(first) if kept.coil_id[i] not in seen], dtype=np.int64)
            seen.update(kept.coil_id[rows].tolist())
            firsts.append(rows)
        n_coils = sum(len(rows) for rows in firsts)
        chosen = np.arange(n_coils)
        if n_coils > self.config.max_reference:
            chosen = np.sort(np.random.default_rng(self.config.seed).choice(n_coils, self.config.max_reference, False))
        offsets = np.cumsum([0, *(len(rows) for rows in firsts)])
        X, y = [], []
        for k, path in enumerate(paths):
            mine = chosen[(chosen >= offsets[k]) & (chosen < offsets[k + 1])] - offsets[k]
            if len(mine):
                data = kept if len(paths) == 1 else load_kept_data(self.model_dir, path)
                X.append(data.X[firsts[k][mine]])
                y.append(data.y[firsts[k][mine]])
        if not X:
            return np.empty((0, 264, 18), np.float32), np.empty(0, np.int64), 0
        return np.concatenate(X), np.concatenate(y), n_coils

    def _data_path(self, record: ModelRecord) -> str | None:
        try:
            relative = Manifest.read(resolve_artifact(self.model_dir, record.artifact_uri)).training_data.get("path")
        except Exception as exc:  # a broken artifact is the assess worker's problem; here it only lacks a reference
            log.warning("no training data for %s v%s: %s", record.name, record.version, exc)
            return None
        return relative if relative and (self.model_dir / relative).is_file() else None

    def _predictions(
        self, records: list[ModelRecord], paths: list[str], sample: CoilSample
    ) -> tuple[np.ndarray | None, str]:
        """The serving ensemble's p_nok on the reference sample, cached per (versions, data, sample, code).

        The key names each version by its name, number and checksum, not its row id: ids come again after a
        database is restored beside a kept ``REPORT_DIR``. The code version is in it because an upgrade may
        change what a model makes of a matrix. A cache that cannot be read or written is a miss, never a failed
        report."""
        versions = sorted((r.name, r.version, r.sha256) for r in records)
        key = hashlib.sha256(
            json.dumps([versions, paths, len(sample), self.config.seed, code_version()]).encode()
        ).hexdigest()[:24]
        cached = self.cache_dir / f"reference-{key}.npy"
        try:
            p_nok = np.load(cached)
            if p_nok.shape == (len(sample),):
                return p_nok, "ensemble of the active versions (cached)"
        except Exception:  # not there yet, or unreadable (a crash before the disk had it leaves 0 bytes: EOFError)
            pass  # computed again and rewritten
        try:
            serving = EnsembleLoader(self.registry, self.model_dir).load()
            if set(serving.records) != {(r.name, r.version) for r in records}:  # a promotion since the reference
                raise RuntimeError("the active versions changed while the report ran")
            if serving.ensemble.needs_images:  # the reference has no images: the live p_nok would not compare
                raise RuntimeError("image assessors vote on the live coils, and the reference coils have no images")
            p_nok = np.concatenate(
                [
                    serving.ensemble.predict_arrays(AssessBatch(sample.X[i : i + PREDICT_CHUNK]))[2]
                    for i in range(0, len(sample), PREDICT_CHUNK)
                ]
            )
        except Exception as exc:  # prediction drift is left out, feature drift is still reported
            log.warning("reference predictions unavailable: %s", exc)
            return None, f"unavailable: {type(exc).__name__}: {exc}"
        tmp = cached.with_name(f"{cached.stem}.{uuid.uuid4().hex[:8]}.tmp.npy")  # two reports may run at once
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            np.save(tmp, p_nok)
            tmp.replace(cached)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("reference predictions not cached: %s", exc)
        return p_nok, "ensemble of the active versions"

    def current(self, start: datetime, end: datetime) -> CoilSample:
        """The window's coils, at most ``max_current`` of them (a seeded draw, in arrival order), read in chunks.

        The memory a report takes must not grow with the window: a week of a busy line, every matrix at once
        with its features in float64, would take the scheduler past its memory limit, and with it ModelScore."""
        latest = latest_feedback(self.engine)
        in_window = (coils.c.received_at >= start) & (coils.c.received_at < end)
        with self.engine.connect() as conn:
            ids = list(
                conn.execute(
                    select(coils.c.coil_id).where(in_window).order_by(coils.c.received_at, coils.c.coil_id)
                ).scalars()
            )
            chosen = ids
            if len(ids) > self.config.max_current:
                drawn = np.random.default_rng(self.config.seed).choice(len(ids), self.config.max_current, replace=False)
                chosen = [ids[i] for i in np.sort(drawn)]
            rows: dict[str, Any] = {}
            unreadable: list[str] = []
            for i in range(0, len(chosen), READ_CHUNK):
                query = (
                    select(coils.c.coil_id, coils.c.matrix, coils.c.p_nok, latest.c.label)
                    .outerjoin(latest, latest.c.coil_id == coils.c.coil_id)
                    .where(coils.c.coil_id.in_(chosen[i : i + READ_CHUNK]))
                )
                for r in conn.execute(query):
                    if (matrix := stored_matrix(r.matrix)) is None:
                        unreadable.append(r.coil_id)
                    else:
                        rows[r.coil_id] = (matrix, r.p_nok, r.label)
        warn_unreadable(unreadable, "the drift report")
        kept = [rows[c] for c in chosen if c in rows]  # a coil deleted meanwhile is left out
        X = np.stack([m for m, _, _ in kept]) if kept else np.empty((0, 264, 18), np.float32)
        description: dict[str, Any] = {"n_coils": len(kept), "first": chosen[0] if chosen else None}
        if len(chosen) < len(ids):
            description["sampled_from"] = len(ids)
        return CoilSample(
            X,
            p_nok=np.array([np.nan if p is None else p for _, p, _ in kept], dtype=np.float64),
            labels=np.array([label for _, _, label in kept], dtype=object),
            description=description,
        )


class FileDriftReportStore:
    """HTML and JSON under ``REPORT_DIR/drift/``, one ``drift_reports`` row pointing at the HTML."""

    def __init__(self, engine: Engine, report_dir: Path) -> None:
        self.engine = engine
        self.report_dir = Path(report_dir)

    def save(self, *, window_start: datetime, window_end: datetime, result: DriftResult, summary: dict) -> int:
        stem = f"{DRIFT_DIR}/{window_end.astimezone(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        html, doc = self.report_dir / f"{stem}.html", self.report_dir / f"{stem}.json"
        html.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(html, result.html)
        summary = {**summary, "report_json": f"{stem}.json"}
        write_atomic(doc, json.dumps(summary, indent=2))
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    drift_reports.insert()
                    .values(
                        created_at=datetime.now(UTC),
                        window_start=window_start,
                        window_end=window_end,
                        dataset_drift=result.dataset_drift,
                        share_drifted=result.share_drifted,
                        report_uri=f"{stem}.html",
                        summary=summary,
                    )
                    .returning(drift_reports.c.id)
                ).scalar_one()
            )

    def prune(self, older_than: datetime) -> int:
        """Delete the files of the reports created before ``older_than``; their rows and figures stay (the API
        lists them without an HTML link). Files go first and the row is cleared after, so a crash between the
        two leaves a row the next prune finishes, never a file no row points at. Returns the reports pruned."""
        query = select(drift_reports.c.id, drift_reports.c.report_uri, drift_reports.c.summary).where(
            drift_reports.c.created_at < older_than, drift_reports.c.report_uri.is_not(None)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        for row in rows:
            for uri in (row.report_uri, (row.summary or {}).get("report_json")):
                if uri and (path := (self.report_dir / uri).resolve()).is_relative_to(self.report_dir.resolve()):
                    path.unlink(missing_ok=True)
            kept = {k: v for k, v in row.summary.items() if k != "report_json"} if row.summary else row.summary
            with self.engine.begin() as conn:
                conn.execute(
                    update(drift_reports).where(drift_reports.c.id == row.id).values(report_uri=None, summary=kept)
                )
        return len(rows)


def run_drift(
    settings: Settings,
    *,
    window: timedelta | None = None,
    now: datetime | None = None,
    engine: Engine | None = None,
) -> DriftOutcome:
    """One drift report over the last ``window`` (default ``DRIFT_WINDOW``), counted in the metrics."""
    config = drift_config(settings)
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    try:
        with engine_for(settings.database_url, engine) as engine:
            store = FileDriftReportStore(engine, settings.report_dir)
            outcome = run_drift_report(
                SqlDriftSource(engine, settings.model_dir, settings.report_dir / DRIFT_DIR / "cache", config),
                store,
                now=now,
                window=window or settings.drift_window,
                config=config,
            )
            if outcome.result is not None:
                # the newest full window's figure: a caught-up report may be of an older one, one by hand shorter
                restore_drift_gauge(engine, settings.drift_window)
            if settings.drift_keep is not None:
                _prune(store, now - settings.drift_keep)
    except Exception:
        METRICS.drift_reports.labels("failed").inc()
        raise
    METRICS.drift_reports.labels(outcome.status.replace(" ", "_")).inc()
    if outcome.result is not None:
        METRICS.drift_seconds.observe(time.perf_counter() - started)
    log.info(outcome.describe(), extra={"report_id": outcome.report_id})
    return outcome


def _prune(store: FileDriftReportStore, older_than: datetime) -> None:
    """Old reports' files away; a failure here (a read-only volume, the database gone) is logged, not the
    report's: that one is written and counted."""
    try:
        if pruned := store.prune(older_than):
            log.info("deleted the files of %d drift reports created before %s (DRIFT_KEEP)", pruned, f"{older_than:%F}")
    except Exception:
        log.exception("could not delete old drift report files; the new report is written")


def full_report_ends(engine: Engine, window: timedelta) -> list[datetime]:
    """Where the reports over at least ``window`` end (their ``window_end``), oldest first: a report by hand over a
    shorter window (``coilguard drift --window 1h``) does not stand in for the daily one. A row a day: all of them."""
    query = select(drift_reports.c.window_start, drift_reports.c.window_end)
    with engine.connect() as conn:
        return sorted(r.window_end for r in conn.execute(query) if _spans(r, window))


def _spans(report: Any, window: timedelta | None) -> bool:
    """A report over at least ``window`` (any, without one): one by hand over an hour is not the day's."""
    return window is None or report.window_end - report.window_start >= window


def restore_drift_gauge(engine: Engine, window: timedelta | None = None) -> float | None:
    """The share of drifted features of the report over the newest window, into ``coilguard_drift_share``: as the
    scheduler starts (the gauge read 0 from every restart until the next daily report, and the drift alert
    resolved with it while the line was as drifted as before), and after each report (a caught-up report of an
    older window is not the line as it is). With ``window``, a report over at least that long is preferred (one by
    hand over an hour is not the day's figure). None (the gauge untouched) before any report."""
    query = (
        select(drift_reports.c.share_drifted, drift_reports.c.window_start, drift_reports.c.window_end)
        .where(drift_reports.c.share_drifted.is_not(None))
        .order_by(drift_reports.c.window_end.desc(), drift_reports.c.id.desc())
    )
    newest, full = None, None
    with engine.connect() as conn:  # a report a day and a few by hand: read until the newest full one
        for row in conn.execution_options(yield_per=100).execute(query):
            newest = newest or row
            if _spans(row, window):
                full = row
                break
    share = (full or newest).share_drifted if newest is not None else None
    if share is not None:
        METRICS.drift_share.set(share)
    return share
