"""The coil paper's decision rule: average the active models' p(NOK) and confidences, threshold at 0.5.

Each member runs once per batch. An assessor that cannot judge a coil (an image model on a coil
without images) abstains: its vote is recorded as such and the average is taken over the members
that voted. A coil on which every member abstains cannot be decided and :meth:`Ensemble.assess` raises;
AssessCoils rejects such a coil with its reason before the vote (``workflows.assess``).

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

ABSTAIN = "ABSTAIN"
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
        return any(m.assessor.consumes == "image" and m.assessor.can_vote for m in self.members)

    @property
    def judges_matrices(self) -> bool:
        """Is there a member that votes on every coil (one that reads the matrix, and never abstains)?"""
        return any(m.assessor.consumes == "matrix" for m in self.members)

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
