"""What the drift report reads: the window's coils (bounded in number, whatever the window holds) and the
serving ensemble's predictions on the reference, cached so that a stale or broken cache is never served."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from helpers import stripe_coils
from sqlalchemy import insert, select, text

from ml.assessors.cnn import CnnAssessor
from ml.drift_compare import DriftConfig
from services.config import load_settings
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.models import Coil, DriftReport
from services.db.repositories import SqlModelRegistry, matrix_bytes
from services.drift import FileDriftReportStore, SqlDriftSource
from workflows.training import register

NOW = datetime(2026, 12, 7, 2, 30, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'drift.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _stored(engine, n: int) -> list[str]:
    """``n`` coils received a minute apart over the last hours, the matrix of coil i filled with i."""
    rows = [
        {
            "coil_id": f"C{i:04d}",
            "line": "galv-1",
            "received_at": NOW - timedelta(minutes=n - i),
            "status": "OK",
            "p_nok": i / n,
            "matrix": matrix_bytes(np.full((264, 18), i, np.float32)),
        }
        for i in range(n)
    ]
    with engine.begin() as conn:
        conn.execute(insert(Coil.__table__), rows)
        conn.execute(text("INSERT INTO feedback (coil_id, label, operator) VALUES ('C0007', 'NOK', 'anna')"))
    return [r["coil_id"] for r in rows]


def test_a_window_larger_than_the_cap_is_drawn_from_in_arrival_order(engine, tmp_path: Path) -> None:
    _stored(engine, 1200)
    source = SqlDriftSource(engine, tmp_path, tmp_path / "cache", DriftConfig(max_current=700, seed=3))
    sample = source.current(NOW - timedelta(days=1), NOW + timedelta(seconds=1))
    assert len(sample) == 700 and sample.description["sampled_from"] == 1200
    values = sample.X[:, 0, 0]
    assert np.all(np.diff(values) > 0)  # arrival order, each coil once
    assert np.allclose(sample.p_nok, values / 1200)  # predictions and labels stay with their coil
    assert [label for v, label in zip(values, sample.labels, strict=True) if label] == (["NOK"] if 7 in values else [])
    again = source.current(NOW - timedelta(days=1), NOW + timedelta(seconds=1))
    assert np.array_equal(again.X, sample.X)  # seeded: the same report twice reads the same coils

    whole = SqlDriftSource(engine, tmp_path, tmp_path / "cache", DriftConfig()).current(
        NOW - timedelta(days=1), NOW + timedelta(seconds=1)
    )
    assert len(whole) == 1200 and "sampled_from" not in whole.description
    assert whole.labels[7] == "NOK" and whole.description["first"] == "C0000"


def test_reference_predictions_are_cached_per_version_and_a_broken_cache_is_a_miss(engine, tmp_path: Path) -> None:
    data = stripe_coils(60, 0.2)
    model = CnnAssessor({"epochs": 1, "seed": 0})
    model.fit(data, device="cpu")
    registry = SqlModelRegistry(engine)
    register(model, registry, tmp_path / "models", status="active", dataset=data)
    cache = tmp_path / "cache"
    source = SqlDriftSource(engine, tmp_path / "models", cache, DriftConfig())

    first = source.reference()
    assert first is not None and first.p_nok is not None
    assert first.description["predictions"] == "ensemble of the active versions"
    [cached] = cache.glob("reference-*.npy")
    assert source.reference().description["predictions"].endswith("(cached)")

    for broken in (b"half a file", b""):  # a disk that filled up as it was written; a crash before it had it
        cached.write_bytes(broken)
        again = source.reference()
        assert again.description["predictions"] == "ensemble of the active versions"
        assert np.allclose(again.p_nok, first.p_nok) and [p.name for p in cache.glob("*.npy")] == [cached.name]
    np.save(cached, np.zeros(3))  # another sample's: the wrong length is a miss too
    assert source.reference().description["predictions"] == "ensemble of the active versions"


def test_the_reference_is_each_kept_coil_once_drawn_one_file_at_a_time(engine, tmp_path: Path) -> None:
    """Two models whose histories share coils, one of them holding an operator's coils three times over: the
    reference draws from the union, each coil once, exactly as from the whole concatenation."""
    from ml.dataset import CoilDataset
    from ml.drift_compare import CoilSample
    from workflows.training import load_kept_data

    a = stripe_coils(60, 0.2, seed=0)
    b = CoilDataset.concat([a.subset(slice(0, 20)), stripe_coils(40, 0.2, seed=1)] + [a.subset(slice(50, 55))] * 2)
    registry = SqlModelRegistry(engine)
    for name, data in (("a", a), ("b", b)):
        model = CnnAssessor({"epochs": 1, "seed": 0}, name=name)
        model.fit(data, device="cpu")
        register(model, registry, tmp_path / "models", status="active", dataset=data)

    for cap in (1000, 30):
        config = DriftConfig(max_reference=cap, seed=5)
        sample = SqlDriftSource(engine, tmp_path / "models", tmp_path / "cache", config).reference()
        paths = sample.description["data"]
        union = CoilDataset.concat([load_kept_data(tmp_path / "models", p) for p in paths]).unique()
        expected = CoilSample(union.X, labels=np.where(union.y == 1, "NOK", "OK").astype(object)).sample(cap, 5)
        assert len(paths) == 2 and sample.description["n_coils"] == len(union) == 100
        assert len(sample) == min(cap, 100) and sample.description.get("sampled_from") == (100 if cap < 100 else None)
        assert np.array_equal(sample.X, expected.X, equal_nan=True)
        assert list(sample.labels) == list(expected.labels)


def test_old_reports_lose_their_files_and_keep_their_rows(engine, tmp_path: Path) -> None:
    """DRIFT_KEEP: a year of daily reports is over a gigabyte of HTML. Old files go; their rows, with the
    figures operators chart, stay; a row pointing outside the report store deletes nothing there."""
    reports, outside = tmp_path / "reports", tmp_path / "elsewhere.html"
    (reports / "drift").mkdir(parents=True)
    outside.write_text("not a report")
    ages = {"old": 500, "kept": 30, "escaping": 600}
    with engine.begin() as conn:
        for stem, days in ages.items():
            uri = "../elsewhere.html" if stem == "escaping" else f"drift/{stem}.html"
            if stem != "escaping":
                (reports / uri).write_text(stem)
                (reports / f"drift/{stem}.json").write_text("{}")
            created = NOW - timedelta(days=days)
            conn.execute(
                insert(DriftReport.__table__).values(
                    created_at=created, window_start=created - timedelta(days=1), window_end=created,
                    dataset_drift=False, share_drifted=0.0, report_uri=uri,
                    summary={"report_json": uri.replace(".html", ".json")},
                )
            )  # fmt: skip
    store = FileDriftReportStore(engine, reports)
    assert store.prune(NOW - timedelta(days=400)) == 2
    assert sorted(p.name for p in (reports / "drift").iterdir()) == ["kept.html", "kept.json"]
    assert outside.read_text() == "not a report"
    with engine.connect() as conn:  # every row is still there, the pruned ones pointing at no file
        rows = conn.execute(select(DriftReport.report_uri, DriftReport.summary).order_by(DriftReport.id)).all()
    assert [(uri, "report_json" in summary) for uri, summary in rows] == [
        (None, False), ("drift/kept.html", True), (None, False),
    ]  # fmt: skip
    assert store.prune(NOW - timedelta(days=400)) == 0  # nothing left to do


def test_drift_keep_is_a_duration_or_off() -> None:
    assert load_settings(drift_keep="90d").drift_keep == timedelta(days=90)
    assert load_settings(drift_keep="off").drift_keep is None
    assert load_settings().drift_keep == timedelta(days=400)


def test_a_report_file_is_on_disk_before_its_row_points_at_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power cut after the row's commit must not leave the row pointing at an empty file: the catch-up would
    take the report as written and never write it again."""
    import ml.durable as durable
    import services.drift as drift

    synced: list[str] = []
    monkeypatch.setattr(durable, "sync_file", lambda path: synced.append(f"file {path.name}"))
    monkeypatch.setattr(durable, "sync_dir", lambda path: synced.append(f"dir {path.name}"))
    drift.write_atomic(tmp_path / "report.html", "<html></html>")  # what the report's writer calls
    assert synced == ["file report.html.tmp", f"dir {tmp_path.name}"]
    assert (tmp_path / "report.html").read_text() == "<html></html>"


def test_a_coil_whose_stored_matrix_is_not_whole_is_left_out_by_name_not_failing_every_run(
    engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A row written or cut short by hand made every drift report and every ReTrain (which reads the labelled
    coils) fail on reshaping it, week after week; the API already showed such a coil without readings."""
    from services.db.repositories import SqlFeedbackStore

    _stored(engine, 10)
    with engine.begin() as conn:
        conn.execute(text("UPDATE coils SET matrix = x'0102' WHERE coil_id IN ('C0003', 'C0007')"))
        conn.execute(text("INSERT INTO feedback (coil_id, label, operator) VALUES ('C0004', 'OK', 'anna')"))
    source = SqlDriftSource(engine, tmp_path, tmp_path / "cache", DriftConfig())
    sample = source.current(NOW - timedelta(days=1), NOW + timedelta(seconds=1))
    assert len(sample) == 8 and 3 not in sample.X[:, 0, 0] and 7 not in sample.X[:, 0, 0]
    assert "2 coil(s) left out of the drift report" in caplog.text and "C0003, C0007" in caplog.text
    labelled = SqlFeedbackStore(engine).labelled_coils()
    assert [c.coil_id for c in labelled] == ["C0004"]  # C0007's NOK is on an unreadable matrix
    assert "1 coil(s) left out of ReTrain's labelled coils" in caplog.text
