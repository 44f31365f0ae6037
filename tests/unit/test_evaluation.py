"""The paper's evaluation protocol on tiny data: cross-validation rows, gold rows for each assessor and the
ensemble (the mean of the members' p_nok), the report's table and plots, and the per-seed summary that
the quality benchmark judges its targets on."""

from __future__ import annotations

import json

import numpy as np
from helpers import stripe_coils

from ml.evaluation.protocol import ENSEMBLE, Plan, evaluate
from ml.evaluation.report import gold_table, mean_gold_f1, seeds_table, write_report

PLAN = {"kinds": ["cnn"], "settings": {"cnn": {"epochs": 1, "batch_size": 32}}, "n_splits": 2, "n_repeats": 1}


def _evaluate(seed: int):
    return evaluate(
        stripe_coils(80, seed=seed),
        stripe_coils(30, seed=seed + 10),
        Plan(**PLAN, seed=seed, bootstrap=50, permutations=50),
    )


def test_protocol_report_and_seed_summary(tmp_path):
    first, second = _evaluate(1), _evaluate(2)

    assert [g.name for g in first.gold_results] == ["cnn", ENSEMBLE]
    assert {(f.name, f.fold) for f in first.folds} == {("cnn", 0), ("cnn", 1), (ENSEMBLE, 0), (ENSEMBLE, 1)}
    member, ensemble = first.gold_results
    np.testing.assert_allclose(ensemble.p_nok, member.p_nok)  # one member: the ensemble is that member
    low, high = member.f1_interval
    assert low <= member.metrics["f1_nok"] <= high

    report = write_report(first, tmp_path)
    assert (tmp_path / "results.json").is_file() and any(tmp_path.glob("*.png"))
    results = json.loads((tmp_path / "results.json").read_text())  # every gold vote, to try decision rules on
    assert results["gold_results"][ENSEMBLE]["p_nok"] == ensemble.p_nok.tolist()
    assert results["y_gold"] == first.y_gold.tolist() and len(results["gold_results"]["cnn"]["p_nok"]) == 30
    assert "| cnn |" in report.read_text() and "| cnn |" in gold_table(first)

    means = mean_gold_f1([first, second])
    expected = np.mean([e.gold_results[0].metrics["f1_nok"] for e in (first, second)])
    assert means["cnn"] == expected
    table = seeds_table([first, second])
    assert "| model | seed 1 | seed 2 | mean ± sd |" in table
    assert f"**{expected:.3f}**" in table
