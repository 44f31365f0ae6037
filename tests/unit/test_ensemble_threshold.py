"""Where the ensemble decides on its members' average: fitted on the validation coils the members share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import stripe_coils

from ml.assessors.base import AssessBatch, ValidationVotes
from ml.assessors.registry import create, load_artifact
from ml.ensemble import MIN_SHARED_PER_CLASS, Ensemble, Member, decision_threshold, shared_validation_threshold
from ml.evaluation.metrics import cost_threshold
from ml.evaluation.protocol import ensemble_p_nok


class _Voted:
    """A stand-in member that only carries validation votes."""

    consumes = "matrix"

    def __init__(self, name: str, votes: ValidationVotes | None) -> None:
        self.name, self.version, self.validation_votes = name, 1, votes


def _votes(ids: list[str], y: list[int], p: list[float]) -> ValidationVotes:
    return ValidationVotes(np.array(ids), np.array(y, np.int8), np.array(p, np.float32))


def _ensemble(*votes: ValidationVotes | None) -> Ensemble:
    return Ensemble([Member(_Voted(f"m{i}", v)) for i, v in enumerate(votes)])  # type: ignore[arg-type]


def _drifted_pair() -> tuple[ValidationVotes, ValidationVotes]:
    """Two members over 20 coils, 8 NOK: one sure of every NOK coil, one that calls half the NOK coils OK,
    so that their average of a NOK coil the second misses sits at 0.45."""
    ids = [f"C{i:02d}" for i in range(20)]
    y = [1] * 8 + [0] * 12
    strong = [0.9] * 8 + [0.1] * 12
    weak = [0.9] * 4 + [0.0] * 4 + [0.1] * 12
    return _votes(ids, y, strong), _votes(ids[::-1], y[::-1], weak[::-1])  # its own order: matched by coil id


def test_the_average_gets_the_least_cost_threshold_on_the_shared_coils() -> None:
    strong, weak = _drifted_pair()
    shared = shared_validation_threshold(_ensemble(strong, weak))
    assert shared is not None and (shared.n_coils, shared.n_nok) == (20, 8)
    assert 0.1 < shared.threshold < 0.45  # every NOK coil's average (0.9 or 0.45) over it, every OK coil's (0.1) under
    average = (strong.p_nok.astype(float) + weak.p_nok[::-1]) / 2
    assert shared.threshold == pytest.approx(cost_threshold(strong.y, average, nok_cost=5.0))
    assert decision_threshold(_ensemble(strong, weak), None) == (shared.threshold, shared.describe())


def test_the_average_is_never_slower_to_call_nok_than_its_members() -> None:
    ids = [f"C{i:02d}" for i in range(20)]
    y = [1] * 8 + [0] * 12
    alarmist = _votes(ids, y, [0.9] * 8 + [0.6] * 12)  # calls every OK coil NOK: the least cost is over 0.6
    twin = _votes(ids, y, [0.9] * 8 + [0.6] * 12)
    assert cost_threshold(alarmist.y, alarmist.p_nok, nok_cost=5.0) > 0.6
    shared = shared_validation_threshold(_ensemble(alarmist, twin))
    assert shared is not None and shared.threshold == 0.5


def test_only_coils_every_member_held_out_with_one_label_count() -> None:
    strong, weak = _drifted_pair()
    partial = _votes(list(weak.coil_id[5:]), list(weak.y[5:]), list(weak.p_nok[5:]))  # misses 5 OK coils
    shared = shared_validation_threshold(_ensemble(strong, partial))
    assert shared is not None and (shared.n_coils, shared.n_nok) == (15, 8)
    relabelled = _votes(list(weak.coil_id), [1 - v for v in weak.y[:3]] + list(weak.y[3:]), list(weak.p_nok))
    shared = shared_validation_threshold(_ensemble(strong, relabelled))
    assert shared is not None and shared.n_coils == 17


def test_the_evaluation_protocol_judges_the_ensemble_where_the_workers_decide() -> None:
    strong, weak = _drifted_pair()
    members = [_Voted("strong", strong), _Voted("weak", weak)]
    gold = np.array([[0.9, 0.5, 0.2], [0.1, 0.2, 0.2]])  # averages 0.5, 0.35, 0.2
    p_nok, threshold = ensemble_p_nok(members, gold)  # type: ignore[arg-type]
    assert threshold == shared_validation_threshold(_ensemble(strong, weak)).threshold  # type: ignore[union-attr]
    assert list(p_nok >= 0.5) == list(gold.mean(axis=0) >= threshold) == [True, True, False]


def test_no_threshold_is_fitted_on_too_few_shared_coils_or_without_votes() -> None:
    strong, weak = _drifted_pair()
    few_nok = MIN_SHARED_PER_CLASS - 1
    apart = _votes(list(weak.coil_id[: 12 + few_nok]), list(weak.y[: 12 + few_nok]), list(weak.p_nok[: 12 + few_nok]))
    assert shared_validation_threshold(_ensemble(strong, apart)) is None
    assert shared_validation_threshold(_ensemble(strong, None)) is None
    assert decision_threshold(_ensemble(strong, None), None)[0] == 0.5
    assert decision_threshold(_ensemble(strong, weak), 0.7) == (0.7, "threshold 0.700 (configured)")


def test_a_trained_assessor_keeps_its_validation_votes_through_save_and_load(tmp_path: Path) -> None:
    data = stripe_coils(160, seed=5)
    cnn = create("cnn", {"epochs": 1, "batch_size": 32, "seed": 2})
    cnn.fit(data, device="cpu")
    votes = cnn.validation_votes
    assert votes is not None and len(votes.coil_id) == len(set(votes.coil_id)) == round(160 * 0.2)
    rows = np.searchsorted(data.coil_id, votes.coil_id, sorter=np.argsort(data.coil_id))
    held_out = np.argsort(data.coil_id)[rows]
    np.testing.assert_array_equal(votes.y, data.y[held_out])
    np.testing.assert_allclose(votes.p_nok, cnn.predict(AssessBatch(data.X[held_out]))[0], atol=1e-6)
    cnn.save(tmp_path / "cnn")
    again = load_artifact(tmp_path / "cnn").validation_votes
    assert again is not None
    for name in ("coil_id", "y", "p_nok"):
        np.testing.assert_array_equal(getattr(again, name), getattr(votes, name))


def test_members_trained_together_share_their_validation_coils() -> None:
    data = stripe_coils(200, nok_share=0.25, seed=6)  # 10 NOK coils held out
    members = []
    for kind in ("cnn", "siamese"):
        assessor = create(kind, {**_quick(kind), "seed": 4})
        assessor.fit(data, device="cpu")
        members.append(Member(assessor))
    shared = shared_validation_threshold(Ensemble(members))
    assert shared is not None and (shared.n_coils, shared.n_nok) == (40, 10)


def _quick(kind: str) -> dict:
    return {"epochs": 1, "batch_size": 32} if kind == "cnn" else {"epochs": 1}
