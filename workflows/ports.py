"""The interfaces the workflows need from storage and messaging; ``services`` implements them.

Keeping them here (and tiny) is what lets the workflows be tested without a database or broker,
and what keeps the dependency arrow pointing one way: services → workflows → ml.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import numpy as np

from ml.ensemble import MemberVote


@dataclass(frozen=True)
class ModelRecord:
    """One row of ``models``: a trained version of a named model."""

    id: int
    name: str
    kind: str
    version: int
    status: str
    artifact_uri: str
    sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    promoted_at: datetime | None = None


@dataclass(frozen=True)
class AssessedCoil:
    """A decided coil, ready to be written: the coil row and one vote per model."""

    coil_id: str
    line: str
    produced_at: datetime
    received_at: datetime
    decided_at: datetime
    label: str
    p_nok: float
    confidence: float
    matrix: np.ndarray
    product: dict[str, Any] | None
    votes: Sequence[MemberVote]


@dataclass(frozen=True)
class StoredDecision:
    """What is already on record for a coil (for idempotency: a coil is decided once)."""

    coil_id: str
    line: str
    label: str
    p_nok: float
    confidence: float
    decided_at: datetime
    published: bool
    votes: Sequence[MemberVote]
    received_at: datetime | None = None  # with ``decided_at``, the latency the decision is announced with
    matrix: np.ndarray | None = None  # the readings it was decided on: a coil sent again must carry the same


class CoilStore(Protocol):
    def decided(self, coil_ids: Sequence[str], with_matrix: bool = False) -> dict[str, StoredDecision]:
        """Coils among ``coil_ids`` that already have a decision."""

    def save_assessed(
        self,
        coils: Sequence[AssessedCoil],
        model_ids: dict[tuple[str, int], int],
        published: Sequence[str] = (),
    ) -> set[str]:
        """Write coils and their votes in one transaction; return the ids actually inserted (a coil
        that another worker inserted first is skipped, not overwritten). ``published``: coils of
        earlier batches whose decisions have since reached the broker, marked in the same transaction
        so that the worker needs one round trip per batch rather than two."""

    def mark_published(self, coil_ids: Sequence[str]) -> None:
        """Record that these coils' decisions reached the broker."""


class ModelRegistry(Protocol):
    def active_models(self) -> list[ModelRecord]: ...

    def get(self, model_id: int) -> ModelRecord: ...

    def all(self, names: Iterable[str] | None = None) -> list[ModelRecord]:
        """Every version (of ``names``), whatever its status, by name and version."""

    def next_version(self, name: str) -> int: ...

    def add(
        self,
        *,
        name: str,
        kind: str,
        version: int,
        artifact_uri: str,
        sha256: str,
        metrics: dict[str, Any] | None = None,
        status: str = "candidate",
        parent_id: int | None = None,
    ) -> ModelRecord:
        """Record a version (:class:`VersionTaken` when that version of the name exists already)."""

    def promote(self, model_id: int, replacing: int | None = None) -> ModelRecord | None:
        """Activate ``model_id`` and retire the name's previous active version, atomically; with ``replacing``,
        only if that version (or, with :data:`NO_ACTIVE_VERSION`, none) is still the active one
        (:class:`ChampionChanged` otherwise, as when another promotion of the name commits at the same time)."""

    def set_status(self, model_id: int, status: str, *, was: str | None = None) -> bool:
        """Set the version's status; with ``was``, only while it still has that status. Whether it changed."""


class VersionTaken(RuntimeError):
    """Another registrant recorded this version of the name first (between a look at the next version and the
    insert): take the next one."""


NO_ACTIVE_VERSION = 0  # promote(replacing=…) when the name is expected to have no active version (ids start at 1)


class ChampionChanged(RuntimeError):
    """The version a challenger was judged against is no longer the active one: promoting it would retire a
    version nobody compared it with."""


class RunOvertaken(RuntimeError):
    """What a ReTrain pass decided on changed before its run could open: the version is no longer the active one
    (another run promoted its challenger, or someone promoted or retired by hand), or another process's run of the
    model judged a challenger meanwhile (its verdict stands until the next pass looks again)."""


class Publisher(Protocol):
    def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Send ``(topic, payload)`` pairs together: one connection, one wait, even when the broker is away."""


# ----------------------------------------------------------------------------- human in the loop


class UnknownCoil(LookupError):
    """Feedback for a coil that was never assessed."""


@dataclass(frozen=True)
class ModelScoreRow:
    """One model version's agreement with the operators over a window (one ``mperformance`` row)."""

    model_id: int
    name: str
    version: int
    window_start: datetime | None
    window_end: datetime
    n_coils: int
    n_correct: int
    tp: int
    predicted_nok: int
    actual_nok: int

    @property
    def score(self) -> float | None:
        return self.n_correct / self.n_coils if self.n_coils else None

    @property
    def precision_nok(self) -> float | None:
        return self.tp / self.predicted_nok if self.predicted_nok else None

    @property
    def recall_nok(self) -> float | None:
        return self.tp / self.actual_nok if self.actual_nok else None


@dataclass(frozen=True)
class LatestScore:
    model: ModelRecord
    n_coils: int
    score: float | None
    computed_at: datetime


@dataclass(frozen=True)
class LabelledCoil:
    coil_id: str
    matrix: np.ndarray
    label: int  # 1 = NOK, the operator's latest word
    produced_at: datetime | None
    feedback_at: datetime


class FeedbackStore(Protocol):
    def add(self, coil_id: str, label: str, operator: str | None, comment: str | None = None) -> int:
        """Record an operator's verdict; raises :class:`UnknownCoil` for a coil never assessed."""

    def labelled_coils(self) -> list[LabelledCoil]:
        """Every coil with feedback, the latest row per coil winning, oldest feedback first."""


class ScoreStore(Protocol):
    def agreement(self, now: datetime, window: timedelta | None) -> list[ModelScoreRow]:
        """Per active model version: its votes on coils with feedback, in the window (None: since promotion)."""

    def record(self, rows: Sequence[ModelScoreRow], below: Sequence[bool], computed_at: datetime) -> None: ...

    def latest(self) -> list[LatestScore]:
        """The newest ``mperformance`` row of every active model version."""


@dataclass(frozen=True)
class FinishedRun:
    """How a model's latest finished ReTrain run ended."""

    id: int
    status: str  # promoted, rejected or failed
    finished_at: datetime
    metrics: dict[str, Any]


class RetrainRuns(Protocol):
    def start(
        self,
        model_id: int,
        reason: str,
        worker: str,
        *,
        require_active: bool = False,
        judged_since: int | None = None,
    ) -> int | None:
        """Open a ``running`` run, or None when another live process is retraining this model. A run left
        ``running`` by a process that died is marked failed first, so it never blocks. Under the same lock, raise
        :class:`RunOvertaken` with ``require_active`` when the version is no longer the active one, and with
        ``judged_since`` (the id of the last judged run the caller saw, 0 for none) when a later run judged a
        challenger: what the caller decided on has changed since it looked."""

    def finish(
        self,
        run_id: int,
        status: str,
        *,
        reason: str | None = None,
        challenger_id: int | None = None,
        metrics: dict[str, Any] | None = None,
        device: str | None = None,
    ) -> None: ...

    def settle_abandoned(self) -> int:
        """Close the ``running`` rows of processes that died, of any model (how many): a run killed just after
        its promotion belongs to a version no later run starts on."""

    def last_judged(self, model_id: int) -> FinishedRun | None:
        """The model's latest run that judged a challenger (``rejected`` or ``promoted``), or None: a ``failed``
        run in between (a device that was away, a database failover) says nothing about the inputs."""
