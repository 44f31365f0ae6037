"""The coil paper's evaluation protocol, for every assessor and for their ensemble.

1. Repeated stratified k-fold cross-validation on the development data (the paper: 5 folds × 10
   repeats on 4,542 coils): each assessor is trained on k−1 folds and judged on the last; the
   ensemble is the average of the members' calibrated p(NOK) on the same fold (``Ensemble.average``, the
   workers' own arithmetic), decided at 0.5.
2. The gold set: every assessor trained once on all development data, then judged on a balanced
   set of 30 OK + 30 NOK coils from a later period of the line, never used for any choice. Its NOK-F1
   gets a bootstrap 95 % interval, and the best two are compared with a paired permutation test.

Numbers only; the report and plots are written by ``ml/evaluation/report.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold

from ml.assessors.base import AssessBatch, Assessor
from ml.assessors.registry import create
from ml.dataset import CoilDataset
from ml.ensemble import Ensemble, Member
from ml.evaluation.metrics import binary_metrics
from ml.evaluation.stats import bootstrap_f1_interval, permutation_test_f1

ENSEMBLE = "ensemble"
Progress = Callable[[dict[str, Any]], None]


@dataclass
class Plan:
    kinds: list[str]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # per kind
    n_splits: int = 5
    n_repeats: int = 10
    seed: int = 0
    device: str = "auto"
    bootstrap: int = 2000
    permutations: int = 5000

    def __post_init__(self) -> None:
        if self.n_splits < 2 or self.n_repeats < 0:  # refused here, not by scikit-learn after the data is built
            raise ValueError(f"need at least 2 folds and 0 or more repeats, not {self.n_splits} × {self.n_repeats}")
        if len(set(self.kinds)) < len(self.kinds):  # one row, one vote and one permutation-test side each
            raise ValueError(f"an assessor named more than once: {self.kinds}")

    @property
    def n_fits(self) -> int:
        return len(self.kinds) * (self.n_splits * self.n_repeats + 1)

    def check_data(self, dev: CoilDataset) -> None:
        """Refuse development data too small for the folds: scikit-learn only warns when a class has fewer coils
        than folds, and a fold without NOK then scores NOK-F1 0 and drags the cross-validation mean down."""
        n_ok = len(dev) - dev.n_nok
        if self.n_repeats and min(dev.n_nok, n_ok) < self.n_splits:
            raise ValueError(
                f"{self.n_splits}-fold cross-validation needs at least {self.n_splits} coils of each class; the data "
                f"has {dev.n_nok} NOK and {n_ok} OK (more coils, fewer folds, or no cross-validation repeats)"
            )


@dataclass
class FoldResult:
    name: str
    repeat: int
    fold: int
    metrics: dict[str, Any]
    fit_s: float


@dataclass
class GoldResult:
    name: str
    metrics: dict[str, Any]
    p_nok: np.ndarray
    f1_interval: tuple[float, float]
    fit_s: float | None = None
    predict_s: float | None = None
    device: str | None = None


@dataclass
class Evaluation:
    plan: Plan
    dev: dict[str, Any]
    gold: dict[str, Any]
    folds: list[FoldResult]
    gold_results: list[GoldResult]
    y_gold: np.ndarray
    comparison: dict[str, Any]

    def cv_summary(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name in [*self.plan.kinds, ENSEMBLE]:
            rows = [f for f in self.folds if f.name == name]
            if not rows:
                continue
            f1 = np.array([r.metrics["f1_nok"] for r in rows])
            auc = np.array([_missing_as_nan(r.metrics["roc_auc"]) for r in rows], dtype=np.float64)
            fit = [r.fit_s for r in rows if r.fit_s]
            out[name] = {
                "f1_mean": float(f1.mean()),
                "f1_sd": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
                "auc_mean": float(np.nanmean(auc)),
                "fit_s_mean": float(np.mean(fit)) if fit else 0.0,
                "folds": len(rows),
            }
        return out


def _missing_as_nan(value: float | None) -> float:
    """None (a fold with one class has no ROC-AUC) as NaN for ``nanmean``; a real 0.0, a model that ranks every
    NOK coil below every OK one, is kept: it is the worst figure there is, not a missing one."""
    return np.nan if value is None else float(value)


def evaluate(dev: CoilDataset, gold: CoilDataset, plan: Plan, progress: Progress | None = None) -> Evaluation:
    notify = progress or (lambda _: None)
    folds = cross_validate(dev, plan, notify)
    gold_results = []
    fitted: list[Assessor] = []
    for kind in plan.kinds:
        notify({"stage": "gold", "kind": kind})
        assessor = _assessor(kind, plan, plan.seed)
        started = time.perf_counter()
        report = assessor.fit(dev, device=plan.device)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        p, _ = assessor.predict(AssessBatch(gold.X))
        predict_s = time.perf_counter() - started
        fitted.append(assessor)
        gold_results.append(_gold(kind, gold.y, p, plan, fit_s, predict_s, report.device))
        notify({"stage": "fit", "kind": kind, "done": True})
    ensemble = _average(fitted, [g.p_nok for g in gold_results])
    gold_results.append(_gold(ENSEMBLE, gold.y, ensemble, plan))
    ranked = sorted(gold_results, key=lambda g: g.metrics["f1_nok"], reverse=True)
    comparison: dict[str, Any] = {}
    if len(ranked) >= 2:
        difference, p_value = permutation_test_f1(
            gold.y, ranked[0].p_nok, ranked[1].p_nok, n=plan.permutations, seed=plan.seed
        )
        comparison = {"best": ranked[0].name, "second": ranked[1].name, "f1_difference": difference, "p_value": p_value}
    return Evaluation(
        plan=plan,
        dev=dev.summary(),
        gold=gold.summary() | {k: gold.meta.get(k) for k in ("labels", "n_ok", "n_nok")},
        folds=folds,
        gold_results=gold_results,
        y_gold=np.asarray(gold.y),
        comparison=comparison,
    )


def cross_validate(dev: CoilDataset, plan: Plan, notify: Progress) -> list[FoldResult]:
    if plan.n_repeats == 0:
        return []
    results: list[FoldResult] = []
    for i, (train, val) in enumerate(cv_folds(dev, plan)):
        repeat, fold = divmod(i, plan.n_splits)
        batch = AssessBatch(dev.X[val])
        members, fitted = [], []
        for kind in plan.kinds:
            notify({"stage": "cv", "kind": kind, "repeat": repeat, "fold": fold})
            assessor = _assessor(kind, plan, plan.seed + i)
            started = time.perf_counter()
            assessor.fit(dev.subset(train), device=plan.device)
            fit_s = time.perf_counter() - started
            p, _ = assessor.predict(batch)
            members.append(p)
            fitted.append(assessor)
            results.append(FoldResult(kind, repeat, fold, binary_metrics(dev.y[val], p), fit_s))
            notify({"stage": "fit", "kind": kind, "done": True})
        ensemble = _average(fitted, members)
        results.append(FoldResult(ENSEMBLE, repeat, fold, binary_metrics(dev.y[val], ensemble), 0.0))
    return results


def cv_folds(dev: CoilDataset, plan: Plan) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row indices of every fold, repeat by repeat.

    A dataset that repeats coils (a ReTrain training set holds each operator-labelled coil several times) is
    split by coil, so that no coil is judged by a model that trained on a copy of it, and each test fold
    holds each of its coils once, as the assessors' own validation split does. Otherwise the folds are
    row-wise and exactly those of earlier releases, so that recorded figures stay reproducible."""
    ids, groups = np.unique(dev.coil_id, return_inverse=True)
    if len(ids) == len(dev):
        splitter = RepeatedStratifiedKFold(n_splits=plan.n_splits, n_repeats=plan.n_repeats, random_state=plan.seed)
        yield from splitter.split(dev.X, dev.y)
        return
    rng = np.random.RandomState(plan.seed)  # one stream for all repeats, as RepeatedStratifiedKFold draws them
    for _ in range(plan.n_repeats):
        splitter = StratifiedGroupKFold(n_splits=plan.n_splits, shuffle=True, random_state=rng)
        for train, test in splitter.split(np.zeros((len(dev), 1)), dev.y, groups):
            yield train, _each_coil_once(test, groups)


def _each_coil_once(rows: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``rows`` with only the first row of each coil: a coil counted three times would weigh three times."""
    _, first = np.unique(groups[rows], return_index=True)
    return np.sort(rows[first])


def _average(fitted: list[Assessor], votes: list[np.ndarray]) -> np.ndarray:
    """The ensemble's p(NOK) from its members' ``votes``, with the workers' own arithmetic."""
    return Ensemble([Member(a) for a in fitted]).average(np.stack(votes))


def _assessor(kind: str, plan: Plan, seed: int) -> Assessor:
    return create(kind, {**plan.settings.get(kind, {}), "seed": seed})


def _gold(
    name: str,
    y: np.ndarray,
    p: np.ndarray,
    plan: Plan,
    fit_s: float | None = None,
    predict_s: float | None = None,
    device: str | None = None,
) -> GoldResult:
    return GoldResult(
        name=name,
        metrics=binary_metrics(y, p),
        p_nok=p,
        f1_interval=bootstrap_f1_interval(y, p, n=plan.bootstrap, seed=plan.seed),
        fit_s=fit_s,
        predict_s=predict_s,
        device=device,
    )
