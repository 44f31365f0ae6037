"""ModelScore: how often each active model agrees with the operators, one ``mperformance`` row per model.

The coil paper's rule decides what happens next: a model scoring below 75 % over *more than* 10
coils is due for retraining. Exactly 10 coils is not enough evidence, and exactly 75 % is not below.
The counting itself is one set-based query in the store (latest feedback per coil wins); this module
holds the rule and the bookkeeping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from workflows.ports import LatestScore, ModelScoreRow, ScoreStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreRule:
    threshold: float = 0.75
    min_coils: int = 10

    def below(self, n_coils: int, score: float | None) -> bool:
        """True when a model must be retrained: score under the threshold over more than ``min_coils``."""
        return score is not None and n_coils > self.min_coils and score < self.threshold


@dataclass(frozen=True)
class ScoredModel:
    row: ModelScoreRow
    below_threshold: bool

    def describe(self) -> str:
        if self.row.score is None:
            return f"{self.row.name} v{self.row.version}: no feedback yet on a coil it voted on"
        flag = "  BELOW THRESHOLD" if self.below_threshold else ""
        return f"{self.row.name} v{self.row.version}: {self.row.score:.1%} over {self.row.n_coils} coils{flag}"


def score_models(
    store: ScoreStore,
    rule: ScoreRule,
    *,
    window: timedelta | None = None,
    now: datetime | None = None,
) -> list[ScoredModel]:
    """Score every active model version and record the result; returns what was recorded."""
    now = now or datetime.now(UTC)
    rows = store.agreement(now, window)
    scored = [ScoredModel(row, rule.below(row.n_coils, row.score)) for row in rows]
    store.record(rows, [s.below_threshold for s in scored], now)
    for s in scored:
        log.info("ModelScore %s", s.describe())
    return scored


def due_for_retraining(latest: list[LatestScore], rule: ScoreRule) -> list[LatestScore]:
    """Active models whose most recent score breaks the rule (evaluated with today's settings)."""
    return [s for s in latest if rule.below(s.n_coils, s.score)]
