"""The statistics of a drift report: do recent coils (and the ensemble's predictions on them) still look like the
data the serving models were trained on? An Evidently report answers per feature and overall, with its HTML page.
Where the two samples come from and where the report goes is the workflow's (workflows/drift_report.py).

- **Reference**: a sample of the active models' training data (at most ``max_reference`` coils), with
  the serving ensemble's ``p_nok`` on it when the caller can compute that.
- **Current**: the coils received in the window, with the ``p_nok`` they were decided with (and the number
  the operators labelled, for the summary).
- **Columns**: the coil features of :mod:`ml.drift` (per-sensor mean, spread and minimum relative to
  the coil's own side, coating level, worst section, edge-to-centre ratio, top/bottom balance), then
  ``p_nok`` (prediction drift) when both sides have it for enough coils. No label drift: operators check every
  coil called NOK and a share of the rest, so the NOK share of their labels is no sample of the line, and
  against the training labels it read as drift on an unchanged line nearly every day; agreement with the
  operators is ModelScore's to judge.
- **Too few values**: a column with values on fewer than ``min_coils`` coils, or half a side's coils if that is
  fewer, is not given to Evidently (one or two readings made a "drift"): it is drifted when the other side has
  enough (a gauge went silent, or came back), and not when neither has.
- **Tests**: two-sample Kolmogorov–Smirnov (p < 0.05) on every feature, chosen explicitly: Evidently's
  automatic choice switches to a normed Wasserstein distance above 1000 reference rows, which flags
  almost every relative feature between two undrifted periods of the same line. ``p_nok`` uses the
  normed Wasserstein distance (threshold 0.1): the reference predictions are in-sample and sharper
  than live ones, and a rank test would call that difference drift every day.
- **Verdict**: the window has drifted when at least ``drift_share`` of the columns drifted (default
  0.2). Evidently's own default of one half would miss a drifted gauge, which moves a handful of the
  ~60 columns; an undrifted simulated day moves one to six.

The HTML report is self-contained (Evidently inlines its JavaScript and icon font): it opens on a
plant network with no internet. Evidently's usage telemetry is switched off before it is imported.
"""

from __future__ import annotations

import html
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ml.drift import FEATURE_NAMES, coil_features, left_out, sensor_of

PREDICTION = "p_nok"


@dataclass(frozen=True)
class DriftConfig:
    drift_share: float = 0.2  # share of drifted columns at which the window counts as drifted
    feature_method: str = "ks"
    prediction_method: str = "wasserstein"
    prediction_threshold: float = 0.1
    min_coils: int = 30  # fewer current coils than this: no report (the tests would mean nothing)
    max_reference: int = 1000
    max_current: int = 5000  # a larger window is drawn from (seeded): a report's memory must not grow with it
    seed: int = 0


@dataclass
class CoilSample:
    """Coils on one side of the comparison: matrices, optionally predictions and operator labels."""

    X: np.ndarray  # (N, 264, 18) g/m², NaN = dropped reading
    p_nok: np.ndarray | None = None  # (N,) ensemble p(NOK), NaN where unknown
    labels: np.ndarray | None = None  # (N,) "OK" / "NOK" / None (not checked by an operator)
    description: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.X)

    def sample(self, n: int, seed: int = 0) -> CoilSample:
        """At most ``n`` coils, drawn without replacement (seeded, order kept)."""
        if len(self) <= n:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return CoilSample(
            self.X[keep],
            None if self.p_nok is None else self.p_nok[keep],
            None if self.labels is None else self.labels[keep],
            {**self.description, "sampled_from": len(self)},
        )

    def n_labelled(self) -> int:
        return 0 if self.labels is None else int(sum(v in ("OK", "NOK") for v in self.labels))


@dataclass(frozen=True)
class ColumnDrift:
    drifted: bool
    score: float | None
    method: str
    threshold: float | None


@dataclass
class DriftResult:
    dataset_drift: bool
    share_drifted: float
    drift_share: float
    columns: dict[str, ColumnDrift]
    n_reference: int
    n_current: int
    html: str

    @property
    def drifted_columns(self) -> list[str]:
        return [name for name, c in self.columns.items() if c.drifted]

    @property
    def drifted_sensors(self) -> list[int]:
        return sorted({s for s in map(sensor_of, self.drifted_columns) if s is not None})

    def summary(self) -> dict[str, Any]:
        return {
            "dataset_drift": self.dataset_drift,
            "share_drifted": round(self.share_drifted, 4),
            "drift_share": self.drift_share,
            "n_columns": len(self.columns),
            "drifted_columns": self.drifted_columns,
            "drifted_sensors": self.drifted_sensors,
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "columns": {name: c.__dict__ for name, c in self.columns.items()},
        }


def feature_frame(sample: CoilSample, *, prediction: bool, without: Collection[int] = ()) -> pd.DataFrame:
    """One row per coil: the :mod:`ml.drift` features (each side's level taken ``without`` those sensors), then
    ``p_nok`` if asked."""
    frame = pd.DataFrame(coil_features(sample.X, without), columns=list(FEATURE_NAMES))
    if prediction and sample.p_nok is not None:
        frame[PREDICTION] = np.asarray(sample.p_nok, dtype=np.float64)
    return frame


def compare(reference: CoilSample, current: CoilSample, config: DriftConfig | None = None) -> DriftResult:
    """Run Evidently's drift preset on the two samples and read its verdicts back."""
    config = config or DriftConfig()
    reference = reference.sample(config.max_reference, config.seed)
    prediction = _has_predictions(reference, config) and _has_predictions(current, config)
    # a gauge dead on either side is left out of its side's level on both: it moves no other gauge's features
    dead = left_out(reference.X, current.X)
    ref = feature_frame(reference, prediction=prediction, without=dead)
    cur = feature_frame(current, prediction=prediction, without=dead)
    # A column with (almost) no value on one side (a gauge dead for the whole window) is what a drift report is
    # for, and Evidently refuses to compare an empty one: it is judged here and left out of Evidently's part.
    unreadable = _thin_columns(ref, cur, config)
    ref, cur = ref.drop(columns=list(unreadable)), cur.drop(columns=list(unreadable))
    if ref.columns.empty:  # no column has values on both sides: Evidently cannot run (it divides by zero)
        return _judged_without_evidently(unreadable, config, len(reference), len(current))
    Report, Dataset, DataDefinition, DataDriftPreset = _evidently()
    definition = DataDefinition(numerical_columns=list(ref.columns))
    preset = DataDriftPreset(
        columns=list(ref.columns),
        drift_share=config.drift_share,
        num_method=config.feature_method,
        per_column_method={PREDICTION: config.prediction_method} if prediction else None,
        per_column_threshold={PREDICTION: config.prediction_threshold} if prediction else None,
    )
    snapshot = Report([preset], include_tests=True).run(
        Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition)
    )
    columns = {**_column_verdicts(snapshot.dict()), **unreadable}
    return _result(columns, config, len(reference), len(current), snapshot.get_html_str(as_iframe=False))


def _result(columns: dict[str, ColumnDrift], config: DriftConfig, n_ref: int, n_cur: int, page: str) -> DriftResult:
    share = _share(columns)
    return DriftResult(
        dataset_drift=share >= config.drift_share,
        share_drifted=share,
        drift_share=config.drift_share,
        columns=columns,
        n_reference=n_ref,
        n_current=n_cur,
        html=page,
    )


def _share(columns: dict[str, ColumnDrift]) -> float:
    return sum(c.drifted for c in columns.values()) / max(len(columns), 1)


def _judged_without_evidently(
    columns: dict[str, ColumnDrift], config: DriftConfig, n_reference: int, n_current: int
) -> DriftResult:
    """Every column empty on one side or both (the window's readings all lost, and no predictions): the verdicts
    are this module's alone, and the report's page says so instead of holding Evidently's."""
    share = _share(columns)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(c.method)}</td></tr>" for name, c in columns.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>coilguard drift report</title></head><body>"
        f"<h1>No column to compare</h1><p>No feature has values in both the reference ({n_reference} coils) and "
        f"the window ({n_current} coils), so Evidently was not run. Share of features drifted: {share:.0%}.</p>"
        f"<table><tr><th>column</th><th>why</th></tr>{rows}</table></body></html>"
    )
    return _result(columns, config, n_reference, n_current, page)


def _enough(values: int, coils: int, config: DriftConfig) -> bool:
    """Values on enough of a side's coils for a test to mean something: ``min_coils``, or half of them if fewer."""
    return values > 0 and values >= min(config.min_coils, (coils + 1) // 2)


def _thin_columns(ref: pd.DataFrame, cur: pd.DataFrame, config: DriftConfig) -> dict[str, ColumnDrift]:
    """Columns with too few values in the reference or in the window (:func:`_enough`): drifted when one side has
    enough and the other not (a gauge went silent, or came back), not when neither has."""
    verdicts = {}
    for name in ref.columns:
        n_ref, n_cur = int(ref[name].notna().sum()), int(cur[name].notna().sum())
        in_ref, in_cur = _enough(n_ref, len(ref), config), _enough(n_cur, len(cur), config)
        if in_ref and in_cur:
            continue
        if not in_ref and not in_cur:
            why = "no values at all" if n_ref == n_cur == 0 else "too few values on both sides"
        elif in_ref:
            why = "no values in the window" if n_cur == 0 else f"values on {n_cur} of {len(cur)} coils in the window"
        else:
            why = "no values in the reference" if n_ref == 0 else f"values on {n_ref} of {len(ref)} reference coils"
        verdicts[name] = ColumnDrift(in_ref != in_cur, None, why, None)
    return verdicts


def _has_predictions(sample: CoilSample, config: DriftConfig) -> bool:
    """Predictions on enough coils (a window of coils still pending has few): a test on one or two is noise."""
    if sample.p_nok is None:
        return False
    return _enough(int(np.isfinite(np.asarray(sample.p_nok, dtype=np.float64)).sum()), len(sample), config)


def _evidently():
    """Evidently, imported with its usage telemetry off (``DO_NOT_TRACK`` and iterative-telemetry's own
    switch; set before the import because the telemetry logger reads them when it is created)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("ITERATIVE_DO_NOT_TRACK", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    return Report, Dataset, DataDefinition, DataDriftPreset


def _column_verdicts(doc: dict[str, Any]) -> dict[str, ColumnDrift]:
    """Per column: Evidently's score and its test verdict (a failed "Value Drift" test = drifted)."""
    scores: dict[str, tuple[float | None, str, float | None]] = {}
    for metric in doc.get("metrics", []):
        config = metric.get("config", {})
        if config.get("type", "").endswith(":ValueDrift"):
            scores[config["column"]] = (metric.get("value"), config.get("method", ""), config.get("threshold"))
    failed = {
        test["metric_config"]["params"]["column"]
        for test in doc.get("tests", [])
        if test.get("metric_config", {}).get("params", {}).get("type", "").endswith(":ValueDrift")
        and test.get("status") == "FAIL"
    }
    return {
        name: ColumnDrift(name in failed, _json_float(score), method, threshold)
        for name, (score, method, threshold) in scores.items()
    }


def _json_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None
