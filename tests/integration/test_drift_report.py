"""Drift reports on simulator data: a drifted gauge is reported, an ordinary day is not, and
``coilguard drift`` leaves an HTML report that a browser renders without the internet, plus its row."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from infra import in_ci
from PIL import Image
from sqlalchemy import insert, select, text

from ml.assessors.base import AssessBatch
from ml.assessors.registry import create
from ml.dataset import CoilDataset
from ml.drift import sensor_of
from ml.drift_compare import CoilSample, DriftResult, compare
from ml.sim import DriftConfig as SimDrift
from ml.sim import LineConfig, LineSimulator
from services.cli import cli
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.models import Coil, DriftReport
from services.db.repositories import SqlModelRegistry, matrix_bytes
from workflows.training import register

SEED = 4
HISTORY = 800  # the reference: what the models were trained on
GAP = 200  # coils between the end of the history and the window
WINDOW = 150  # about a day and a half of a real line

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    # nothing resolves: the report must render from its own bytes, as on a plant network
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=20000",
    "--window-size=1400,1800",
)


@pytest.fixture(scope="module")
def line() -> dict[str, CoilDataset | tuple[int, ...]]:
    """One simulated line: its history, an ordinary later window, and the same window with three gauges off."""
    sim = LineSimulator(LineConfig(seed=SEED, id_prefix="H"))
    history = sim.dataset(HISTORY)
    sim.dataset(GAP)
    ordinary = sim.dataset(WINDOW)
    start = HISTORY + GAP
    drifted_line = LineSimulator(
        LineConfig(seed=SEED, id_prefix="D", first_index=start, drift=SimDrift("sensor-drift", start=start, ramp=0))
    )
    drifted = drifted_line.dataset(WINDOW)
    return {"history": history, "ordinary": ordinary, "drifted": drifted, "sensors": drifted_line.drifted_sensors}


def test_an_ordinary_window_is_not_drift(line: dict) -> None:
    result = compare(CoilSample(line["history"].X), CoilSample(line["ordinary"].X))
    assert not result.dataset_drift, result.drifted_columns
    assert result.share_drifted < result.drift_share
    assert "<script>" in result.html


def test_a_gauge_dead_for_the_whole_window_is_reported_not_a_crash(line: dict) -> None:
    """A cable fails and the gateway sends null for one sensor all day: the features of that sensor have no
    value at all in the window. That is drift to report, and Evidently refuses to compare an empty column."""
    silent = line["ordinary"].X.copy()
    silent[:, :, 5] = np.nan
    result = compare(CoilSample(line["history"].X), CoilSample(silent))
    dead = [name for name in result.columns if name.startswith("s05_")]
    assert dead and all(result.columns[name].drifted for name in dead), {n: result.columns[n] for n in dead}
    assert all(result.columns[name].method == "no values in the window" for name in dead if name.endswith("_mean"))
    # Its side's other gauges are measured against the same sensors on both sides, so none is blamed for it (the
    # median of the other eight had moved every feature of the side: seven sensors drifted, and the window). Every
    # other verdict is the one the same window gets with sensor 5 alive, when a reference without it leaves it out.
    unheard = line["history"].X.copy()
    unheard[:, :, 5] = np.nan
    alive = compare(CoilSample(unheard), CoilSample(line["ordinary"].X))

    def others(r: DriftResult) -> dict[str, bool]:
        return {name: c.drifted for name, c in r.columns.items() if sensor_of(name) != 5}

    assert others(result) == others(alive) and not result.dataset_drift, result.drifted_columns


def test_a_column_with_values_on_a_few_coils_is_not_left_to_a_test(line: dict) -> None:
    """A gauge dropped on all but two coils of the window, and all but one coil still pending: one or two values
    made a KS or Wasserstein "drift" (and a prediction column out of a single decision)."""
    window = line["ordinary"].X[:40].copy()
    window[2:, :, 6] = np.nan
    p_nok = np.full(40, np.nan)
    p_nok[0] = 0.9
    reference = CoilSample(line["history"].X, p_nok=np.linspace(0.0, 0.3, HISTORY))
    result = compare(reference, CoilSample(window, p_nok=p_nok))
    assert "p_nok" not in result.columns
    sparse = {name: c for name, c in result.columns.items() if name.startswith("s06_")}
    assert all(c.drifted and c.method == "values on 2 of 40 coils in the window" for c in sparse.values()), sparse
    assert len(sparse) == 3 and not result.dataset_drift, result.drifted_columns


def test_operator_labels_are_not_compared_with_the_training_labels(line: dict) -> None:
    """Operators check every coil called NOK and a share of the rest: their labels hold many more NOK than the
    line makes, and against the training labels that was label drift on an unchanged line nearly every day."""
    history, window = line["history"], line["ordinary"]
    checked = (window.y == 1) | (np.arange(len(window)) % 5 == 0)
    labels = np.where(checked, np.where(window.y == 1, "NOK", "OK"), None).astype(object)
    reference = CoilSample(history.X, labels=np.where(history.y == 1, "NOK", "OK").astype(object))
    result = compare(reference, CoilSample(window.X, labels=labels))
    assert "operator_label" not in result.columns and not result.dataset_drift, result.drifted_columns


def test_a_window_with_no_readings_left_is_reported_without_evidently(line: dict) -> None:
    """Every reading of the window lost and no predictions: no column has values on both sides, and Evidently,
    given none, divided by zero. Every feature is reported as drifted instead, on a page of its own."""
    lost = np.full_like(line["ordinary"].X, np.nan)
    result = compare(CoilSample(line["history"].X), CoilSample(lost))
    assert result.dataset_drift and result.share_drifted == 1.0
    assert all(c.method == "no values in the window" for c in result.columns.values())
    assert "No column to compare" in result.html and "<script" not in result.html  # opens offline as it is


def test_coilguard_drift_reports_a_drifted_gauge(
    line: dict, pg_database_factory: Callable[[], str], tmp_path: Path, output_dir: Path
) -> None:
    url = pg_database_factory()
    upgrade(url)
    engine = make_engine(url)
    model_dir, report_dir = tmp_path / "models", tmp_path / "reports"
    history, drifted = line["history"], line["drifted"]

    # a model in service whose kept training data is the history (a quick fit: this is about drift), some
    # coils three times over as after a ReTrain (the reference counts each coil once)
    cnn = create("cnn", {"epochs": 1, "seed": 0})
    cnn.fit(history.subset(slice(0, 150)), device="cpu")
    kept = CoilDataset.concat([history] + [history.subset(slice(0, 50))] * 2)
    register(cnn, SqlModelRegistry(engine), model_dir, status="active", dataset=kept)

    # the drifted coils as AssessCoils would have stored them during the last day, some checked by operators
    p_nok, confidence = cnn.predict(AssessBatch(drifted.X))
    now = datetime.now(UTC)
    rows = [
        {
            "coil_id": str(coil_id),
            "line": "galv-1",
            "produced_at": now - timedelta(hours=20) + timedelta(minutes=5 * i),
            "received_at": now - timedelta(hours=20) + timedelta(minutes=5 * i),
            "status": "NOK" if p >= 0.5 else "OK",
            "p_nok": float(p),
            "confidence": float(c),
            "decided_at": now - timedelta(hours=20) + timedelta(minutes=5 * i),
            "matrix": matrix_bytes(x),
        }
        for i, (coil_id, x, p, c) in enumerate(zip(drifted.coil_id, drifted.X, p_nok, confidence, strict=True))
    ]
    with engine.begin() as conn:
        conn.execute(insert(Coil.__table__), rows)
        for coil_id, y in list(zip(drifted.coil_id, drifted.y, strict=True))[::4]:
            conn.execute(
                text("INSERT INTO feedback (coil_id, label, operator) VALUES (:c, :l, 'shift-a')"),
                {"c": str(coil_id), "l": "NOK" if y else "OK"},
            )

    env = {
        "COILGUARD_DATABASE_URL": url,
        "COILGUARD_MODEL_DIR": str(model_dir),
        "COILGUARD_REPORT_DIR": str(report_dir),
        "COILGUARD_DEVICE": "cpu",
    }
    # the real command, in this process (a second interpreter would import torch and Evidently again)
    run = CliRunner().invoke(cli, ["drift", "--window", "24h"], env=env, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "drift report #1: drift" in run.output, run.output

    with engine.connect() as conn:
        row = conn.execute(select(DriftReport.__table__)).one()
    engine.dispose()
    summary = row.summary
    assert row.dataset_drift and row.share_drifted >= summary["drift_share"]
    assert summary["n_current"] == WINDOW and summary["reference"]["n_coils"] == HISTORY
    assert summary["current"]["n_labelled"] == len(rows[::4])
    assert "p_nok" in summary["columns"]  # prediction drift was compared; labels are not (see the next tests)
    assert "operator_label" not in summary["columns"]
    for sensor in line["sensors"]:  # each drifted gauge shows in its own features
        assert {f"s{sensor:02d}_mean", f"s{sensor:02d}_min"} & set(summary["drifted_columns"]), sensor
    html = report_dir / row.report_uri
    assert html.is_file() and (report_dir / summary["report_json"]).is_file()
    _render(html, output_dir / "drift_report.png")


def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), *CHROMIUM_NAMES):
        if name and (found := shutil.which(name)):
            return found
    return None


def _render(html: Path, screenshot: Path) -> None:
    """Open the report in headless Chromium with name resolution switched off: the dashboard must draw."""
    browser = _chromium()
    if browser is None:
        message = "no Chromium binary found (apt-get install chromium, or set CHROMIUM)"
        if in_ci():
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    screenshot.unlink(missing_ok=True)
    shot = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--screenshot={screenshot}", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert screenshot.is_file(), shot.stderr[-2000:]
    # The page is drawn by the report's inlined JavaScript: without it the screenshot is a blank white
    # page. Rendered, it shows text and Evidently's red distribution charts.
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    ink = (pixels.sum(axis=2) < 600).mean()
    red = ((pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)).mean()
    assert ink > 0.01 and red > 0.002, f"the report did not render: {ink:.2%} ink, {red:.2%} red"
