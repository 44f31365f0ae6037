"""The cross-validation protocol's folds and their summary, without training a network: a stand-in assessor
records what each fold trained and judged on."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
from helpers import stripe_coils
from sklearn.model_selection import RepeatedStratifiedKFold

import ml.evaluation.protocol as protocol
from ml.assessors.base import AssessBatch
from ml.dataset import CoilDataset
from ml.evaluation.protocol import ENSEMBLE, Evaluation, FoldResult, Plan, cross_validate, cv_folds

PLAN = Plan(kinds=["stand-in"], n_splits=3, n_repeats=2, seed=7)


def _with_repeats(n: int = 45, copies: int = 3, repeated: int = 12) -> CoilDataset:
    """``n`` coils, the first ``repeated`` of them ``copies`` times over (as ReTrain weights operator-labelled
    coils); each coil's number is written into its first reading, so that a fold's matrices name their coils."""
    coils = stripe_coils(n, nok_share=0.3, seed=4)
    coils.X[:, 0, 0] = np.arange(n)
    return CoilDataset.concat([coils] + [coils.subset(np.arange(repeated))] * (copies - 1))


class _Recorder:
    """A stand-in assessor: remembers the coils it trained on and was asked about, votes 0.5 on each."""

    name, version, consumes = "stand-in", 1, "matrix"
    folds: ClassVar[list[tuple[set[float], list[float]]]] = []  # every fold's, in order; reset per test

    def fit(self, dataset: CoilDataset, device: str = "cpu") -> Any:
        self.trained = set(dataset.X[:, 0, 0].tolist())

    def predict(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray]:
        _Recorder.folds.append((self.trained, batch.matrices[:, 0, 0].tolist()))
        half = np.full(len(batch), 0.5, dtype=np.float32)
        return half, half


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[_Recorder]:
    _Recorder.folds = []
    monkeypatch.setattr(protocol, "_assessor", lambda kind, plan, seed: _Recorder())
    return _Recorder


def test_no_coil_is_judged_by_a_model_that_trained_on_a_copy_of_it(recorder: type[_Recorder]) -> None:
    dev = _with_repeats()
    cross_validate(dev, PLAN, lambda _: None)
    assert len(recorder.folds) == PLAN.n_splits * PLAN.n_repeats
    for trained, judged in recorder.folds:
        assert not trained & set(judged)
        assert len(judged) == len(set(judged))  # each coil once: a copy would weigh it twice
    for repeat in range(PLAN.n_repeats):  # every coil judged once per repeat
        folds = recorder.folds[repeat * PLAN.n_splits : (repeat + 1) * PLAN.n_splits]
        assert sorted(c for _, judged in folds for c in judged) == list(range(45))


def test_folds_by_coil_are_reproducible_by_seed_and_differ_between_repeats() -> None:
    dev = _with_repeats()
    first, again = list(cv_folds(dev, PLAN)), list(cv_folds(dev, PLAN))
    for (train, test), (train2, test2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(train, train2)
        np.testing.assert_array_equal(test, test2)
    repeats = [[frozenset(test.tolist()) for _, test in first[r * 3 : (r + 1) * 3]] for r in range(2)]
    assert set(repeats[0]) != set(repeats[1])
    other = list(cv_folds(dev, Plan(**{**PLAN.__dict__, "seed": 8})))
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    for _, test in first:  # the NOK coils are spread over the folds
        assert dev.y[test].sum() > 0


def test_coils_that_do_not_repeat_keep_the_row_wise_folds_of_earlier_releases() -> None:
    """Recorded figures stay reproducible: the same folds, row for row, as before coil ids were looked at."""
    dev = stripe_coils(40, seed=2)
    expected = RepeatedStratifiedKFold(n_splits=3, n_repeats=2, random_state=7).split(dev.X, dev.y)
    for (train, test), (train2, test2) in zip(cv_folds(dev, PLAN), expected, strict=True):
        np.testing.assert_array_equal(train, train2)
        np.testing.assert_array_equal(test, test2)


def _fold(fold: int, f1: float, auc: float | None) -> FoldResult:
    return FoldResult("cnn", 0, fold, {"f1_nok": f1, "roc_auc": auc}, 1.0)


def test_a_roc_auc_of_zero_counts_and_only_a_missing_one_is_left_out() -> None:
    """0.0 is a model that ranks every NOK coil below every OK one: the worst figure, not a missing one."""
    folds = [_fold(0, 0.0, 0.0), _fold(1, 0.4, None), _fold(2, 0.6, 0.5)]
    evaluation = Evaluation(Plan(kinds=["cnn"]), {}, {}, folds, [], np.array([]), {})
    summary = evaluation.cv_summary()
    assert summary["cnn"]["auc_mean"] == pytest.approx(0.25)
    assert summary["cnn"]["folds"] == 3 and ENSEMBLE not in summary
