"""The label rule: when is a coil NOK, how close was it, and what does the operator write down.

Rule (on the *true* per-section, per-side coating, never on the measurement)
    A coil is NOK when, on any sensor, at least ``min_run`` consecutive *relevant* sections are
    below the product's per-side minimum. Relevant sections exclude the first and last
    ``trim_sections`` rows: head and tail are cut off at the exit shear anyway, so a transient there
    does not matter. One thin section is not enough: a single 10 m section below the minimum is
    within what the standard's spot sampling would plausibly never hit, three in a row are not.

Margin
    ``margin = worst / min_side − 1`` where ``worst`` is the lowest value that some run of
    ``min_run`` relevant sections on one sensor stays at or below (the minimum over windows of the
    window maximum). NOK ⇔ margin < 0, and the margin says by how much a coil passed or failed.

Borderline and operator labels
    A coil is borderline when ``|margin| < borderline_band``. The operator's label is the true
    label flipped with probability ``borderline_noise`` for borderline coils (a judgement call on
    a handful of g/m²) and ``label_noise`` for the rest (typing errors, a coil checked in a hurry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelRule:
    trim_sections: int = 5
    min_run: int = 3
    borderline_band: float = 0.03
    label_noise: float = 0.01
    borderline_noise: float = 0.25


@dataclass(frozen=True)
class Verdict:
    true_label: int
    label: int
    margin: float
    borderline: bool


def true_margin(true: np.ndarray, min_side: float, rule: LabelRule) -> float:
    """Relative margin of the worst ``min_run``-section run of relevant rows over the per-side minimum."""
    rel = true[rule.trim_sections : len(true) - rule.trim_sections]
    n = len(rel) - rule.min_run + 1
    run_max = rel[:n]
    for k in range(1, rule.min_run):  # the max over each window of min_run rows, by shifting
        run_max = np.maximum(run_max, rel[k : k + n])
    return float(run_max.min() / min_side - 1.0)


def judge(true: np.ndarray, min_side: float, rule: LabelRule, rng: np.random.Generator) -> Verdict:
    """True label, operator label, margin and borderline flag for one coil."""
    margin = true_margin(true, min_side, rule)
    nok = int(margin < 0.0)
    borderline = abs(margin) < rule.borderline_band
    flip = rng.random() < (rule.borderline_noise if borderline else rule.label_noise)
    return Verdict(true_label=nok, label=nok ^ int(flip), margin=margin, borderline=bool(borderline))
