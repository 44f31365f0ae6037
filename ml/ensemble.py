"""The coil paper's decision rule: average the active models' p(NOK) and confidences, then threshold the average.

The threshold is 0.5 in the paper. Each member's p(NOK) is calibrated so that 0.5 is its own least-cost
threshold, but their average is not: under a drift the weaker members lose their NOK votes first and pull the
average of a NOK coil under 0.5 while the best members still call it. :func:`shared_validation_threshold`
therefore fits the average's threshold the way each member's was fitted, by the least cost on validation
coils, here the ones every member held out (members trained together on the same data hold out the same
coils); the workers use it unless a threshold is configured (docs/benchmarks.md, the quality notes).

Each member runs once per batch. An assessor that cannot judge a coil (an image model on a coil
without images) abstains: its vote is recorded as such and the average is taken over the members
that voted. A coil on which every member abstains is decided by nobody and flagged so.

With ``shards`` > 1 a batch of at least ``MIN_SHARD_COILS`` coils per shard is split into up to that
many pieces, voted on at once by as many threads; :func:`share_threads` divides torch's intra-op threads
among them. On two cores shared with the database and the broker, two single-threaded shards decided
18-20 % more coils a second end to end than the whole batch on two intra-op threads (docs/benchmarks.md,
the throughput notes). The likely reason: the two threads of one op must finish together, so a core
taken by another process stalls both, while two shards go on apart.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from ml.assessors.base import AssessBatch, Assessor
from ml.evaluation.metrics import cost_threshold

ABSTAIN = "ABSTAIN"
NOK_COST = 5.0
"""A missed NOK coil costs this many false alarms: the paper's 5:1, the members' default class weight."""
MIN_SHARED_PER_CLASS = 5
"""Fewer shared validation coils of either class than this and the average's threshold is not fitted."""
MIN_SHARD_COILS = 8
"""A smaller batch is voted on whole by the calling thread: a deep network's per-call cost (10 ms for one coil
through EfficientNet-Lite0 on one core) would make single-coil shards slower than no split."""


@functools.cache
def _torch_threads_at_start() -> int:
    """Torch's count before any :func:`share_threads`, so that a second call shares the same total."""
    return torch.get_num_threads()


def share_threads(shards: int, total: int = 0) -> int:
    """Give each of ``shards`` voting threads its share of ``total`` intra-op threads (0: torch's own count).

    Torch's thread count is one setting for the whole process, not per thread, so this sets it for
    everything the process runs, small batches voted whole included. Returns the shards that fit: never
    more than the threads.
    """
    total = total or _torch_threads_at_start()
    shards = max(1, min(shards, total))
    torch.set_num_threads(max(1, total // shards))
    return shards


@dataclass(frozen=True)
class Member:
    assessor: Assessor
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.assessor.name

    @property
    def version(self) -> int:
        return int(self.assessor.version or 0)


@dataclass(frozen=True)
class MemberVote:
    model: str
    version: int
    label: str  # "OK", "NOK" or "ABSTAIN"
    p_nok: float | None
    confidence: float | None


@dataclass(frozen=True)
class EnsembleDecision:
    label: str  # "OK" or "NOK"
    p_nok: float
    confidence: float
    votes: tuple[MemberVote, ...]

    @property
    def n_voted(self) -> int:
        return sum(v.label != ABSTAIN for v in self.votes)


class Ensemble:
    def __init__(self, members: list[Member], threshold: float = 0.5, shards: int = 1) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        self.members = list(members)
        self.threshold = threshold
        self.shards = shards
        self._pool: ThreadPoolExecutor | None = None

    @property
    def versions(self) -> dict[str, int]:
        return {m.name: m.version for m in self.members}

    @property
    def needs_images(self) -> bool:
        return any(m.assessor.consumes == "image" for m in self.members)

    def predict_arrays(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per member and coil (M, N): p_nok and confidence (NaN = abstained); then the weighted averages (N,)."""
        parts = min(self.shards, len(batch) // MIN_SHARD_COILS)
        if parts < 2:
            p, c = self._vote(batch)
        else:
            pending = [self._shard_pool().submit(self._vote, part) for part in batch.split(parts)]
            wait(pending)  # a shard that fails must not leave the other running into the next batch
            votes = [future.result() for future in pending]
            p = np.concatenate([v[0] for v in votes], axis=1)
            c = np.concatenate([v[1] for v in votes], axis=1)
        return p, c, self.average(p), self.average(c)

    def average(self, values: np.ndarray) -> np.ndarray:
        """The members' weighted mean per coil of (M, N) ``values``, over the members that voted (not NaN)."""
        weights = np.array([m.weight for m in self.members], dtype=np.float64)[:, None]
        w = np.where(np.isnan(values), 0.0, weights)
        total = w.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, np.nansum(values * w, axis=0) / total, np.nan)

    def _vote(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray]:
        """Every member's p_nok and confidence on ``batch``, (M, N) each."""
        p = np.empty((len(self.members), len(batch)), dtype=np.float64)
        c = np.empty_like(p)
        for i, member in enumerate(self.members):
            p[i], c[i] = member.assessor.predict(batch)
        return p, c

    def _shard_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:  # one caller at a time: the worker's inference thread
            self._pool = ThreadPoolExecutor(self.shards, "ensemble-shard")
        return self._pool

    def close(self) -> None:
        """Let the shard threads go (a replaced ensemble's would otherwise wait for the garbage collector)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def assess(self, batch: AssessBatch) -> list[EnsembleDecision]:
        p, c, p_avg, c_avg = self.predict_arrays(batch)
        decisions = []
        for j in range(len(batch)):
            votes = tuple(
                MemberVote(m.name, m.version, ABSTAIN, None, None)
                if np.isnan(p[i, j])
                else MemberVote(m.name, m.version, "NOK" if p[i, j] >= 0.5 else "OK", float(p[i, j]), float(c[i, j]))
                for i, m in enumerate(self.members)
            )
            if np.isnan(p_avg[j]):
                raise ValueError("every member abstained on a coil; the ensemble needs a matrix assessor")
            label = "NOK" if p_avg[j] >= self.threshold else "OK"
            decisions.append(EnsembleDecision(label, float(p_avg[j]), float(c_avg[j]), votes))
        return decisions


@dataclass(frozen=True)
class SharedValidation:
    """The average's least-cost threshold and the validation coils it was chosen on."""

    threshold: float
    n_coils: int
    n_nok: int

    def describe(self) -> str:
        return f"threshold {self.threshold:.3f} from {self.n_coils} shared validation coils ({self.n_nok} NOK)"


def shared_validation_threshold(
    ensemble: Ensemble, nok_cost: float = NOK_COST, low: float = 0.05, high: float = 0.5
) -> SharedValidation | None:
    """The threshold on the members' average p(NOK) with the least cost on the validation coils every member
    held out, never above ``high`` (the members' own 0.5); None where that cannot be said: a member without
    recorded votes (image assessors, models saved by older releases), or fewer than
    :data:`MIN_SHARED_PER_CLASS` shared coils of a class (members trained apart, as after ReTrain replaced one,
    share few). A coil whose labels differ between the members' training data is left out.

    Why the cap: above 0.5 the ensemble would be slower to call NOK than each of its members, the wrong way both
    for the 5:1 cost and under drift, where members lose NOK votes first (why the threshold is fitted at all).
    With a dozen or two validation NOK coils, some labelled wrongly by operators, the uncapped fit went to 0.60
    on two simulated lines of nine and missed NOK coils of the later period there (docs/benchmarks.md)."""
    votes = [m.assessor.validation_votes for m in ensemble.members]
    if any(v is None for v in votes):
        return None
    shared = functools.reduce(np.intersect1d, [v.coil_id for v in votes])  # type: ignore[union-attr]
    p = np.empty((len(votes), len(shared)), dtype=np.float64)
    y = np.empty((len(votes), len(shared)), dtype=np.int8)
    for i, v in enumerate(votes):
        assert v is not None
        order = np.argsort(v.coil_id)
        at = order[np.searchsorted(v.coil_id, shared, sorter=order)]
        p[i], y[i] = v.p_nok[at], v.y[at]
    agreed = (y == y[0]).all(axis=0)
    y_shared, p_avg = y[0][agreed].astype(bool), ensemble.average(p[:, agreed])
    n_nok = int(y_shared.sum())
    if min(n_nok, len(y_shared) - n_nok) < MIN_SHARED_PER_CLASS:
        return None
    threshold = cost_threshold(y_shared, p_avg, nok_cost=nok_cost, low=low, high=high)
    return SharedValidation(threshold, len(y_shared), n_nok)


def decision_threshold(ensemble: Ensemble, configured: float | None) -> tuple[float, str]:
    """The threshold the ensemble decides at, and where it came from: ``configured`` when it is set, else
    :func:`shared_validation_threshold`, else the paper's 0.5."""
    if configured is not None:
        return configured, f"threshold {configured:.3f} (configured)"
    shared = shared_validation_threshold(ensemble)
    if shared is None:
        return 0.5, "threshold 0.5 (the members share too few validation coils to fit one)"
    return shared.threshold, shared.describe()
