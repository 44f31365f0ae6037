"""AssessCoils: a micro-batch of raw MQTT messages in, stored decisions and messages to publish out.

The rules that make it safe to run N replicas and to crash at any moment:

* a coil is decided once: a coil id already on record is not assessed again and gets no second
  row; its stored decision is re-sent only if it never reached the broker;
* one transaction per batch writes the coils and every vote; the caller acknowledges the MQTT
  messages only after that commit (and after the decisions are published);
* a message that cannot be assessed becomes a rejection with its reason; it never stops the batch.

Everything here is plain Python over the ports; the worker in ``services`` owns threads and sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ml.assessors.base import AssessBatch, Assessor
from ml.ensemble import Ensemble, EnsembleDecision, Member, MemberVote
from ml.images import OVER_PIL_LIMIT, decode_image, fit_within
from workflows.messages import (
    SURFACE,
    CoilMessage,
    Decision,
    RejectedMessage,
    Rejection,
    Vote,
    dumps,
    parse_coil_message,
)
from workflows.ports import AssessedCoil, CoilStore, ModelRecord, ModelRegistry, StoredDecision
from workflows.topics import Topics
from workflows.training import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawMessage:
    topic: str
    payload: bytes
    received_at: float  # epoch seconds, when the worker got it


# A message's surface images are decoded to this many pixels together at most (reduced when they hold more):
# 16 MB of float32 a coil, 1 GiB for a batch of 64; a 2448 × 2048 camera frame is reduced by 2, NEU's 200 px not.
MAX_DECODED_PIXELS = 1 << 22
# A PNG is decoded in full before it is reduced (a JPEG at up to 1/8 a side): 4096², 67 MB as 16-bit RGBA.
MAX_SOURCE_PIXELS = 1 << 24

NO_ONE_TO_JUDGE = (
    "no surface images, and every active model assesses images: send the coil's images, or register a matrix "
    "assessor too (coilguard train --assessor cnn --register)"
)
NO_MODEL_VOTES = (
    "no active model gives a coil its NOK probability (image classifiers of defect types alone abstain on every "
    "coil): register a matrix assessor (coilguard train --assessor cnn --register) or one trained with a "
    "defect-free class"
)


class NoActiveModel(RuntimeError):
    """Nothing to vote with yet: the worker waits for a model rather than exiting."""


@dataclass
class Outgoing:
    topic: str
    payload: bytes
    coil_id: str | None = None  # a decision's coil (None for a rejection): what to hold back if it is refused
    line: str | None = None


@dataclass
class BatchResult:
    """What one batch produced. ``publish`` must reach the broker before the batch is acknowledged."""

    decided: list[Decision] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    publish: list[Outgoing] = field(default_factory=list)

    @property
    def to_mark_published(self) -> list[str]:
        return [d.coil_id for d in self.decided] + self.republished

    def extend(self, other: BatchResult) -> None:
        for name in ("decided", "republished", "duplicates", "rejected", "publish"):
            getattr(self, name).extend(getattr(other, name))


@dataclass
class Prepared:
    """A batch between its two halves: rejections and duplicates settled, the rest voted on, nothing written."""

    result: BatchResult
    model_ids: dict[tuple[str, int], int]
    assessed: list[AssessedCoil] = field(default_factory=list)
    decisions: list[EnsembleDecision] = field(default_factory=list)
    messages: dict[str, RawMessage] = field(default_factory=dict)  # each voted coil's message, for a rejection

    @classmethod
    def merge(cls, parts: list[Prepared]) -> Prepared:
        """Parts prepared one message at a time (``AssessCoils.merge`` settles what they share) put together."""
        merged = cls(BatchResult(), parts[0].model_ids if parts else {})
        for part in parts:
            merged.result.extend(part.result)
            merged.assessed.extend(part.assessed)
            merged.decisions.extend(part.decisions)
            merged.messages.update({coil.coil_id: part.messages[coil.coil_id] for coil in part.assessed})
        return merged

    def split(self) -> list[Prepared]:
        """One part per voted coil (the first also carries the rejections), to isolate a coil that breaks."""
        parts = [
            Prepared(BatchResult(), self.model_ids, [a], [d], {a.coil_id: self.messages[a.coil_id]})
            for a, d in zip(self.assessed, self.decisions, strict=True)
        ]
        if parts:
            parts[0].result = self.result
        return parts or [self]


# ----------------------------------------------------------------------------- the ensemble in service


@dataclass
class ServingEnsemble:
    """The ensemble plus the registry rows behind it, so every vote can name its model version."""

    ensemble: Ensemble
    records: dict[tuple[str, int], ModelRecord]

    @property
    def model_ids(self) -> dict[tuple[str, int], int]:
        return {key: record.id for key, record in self.records.items()}

    def describe(self) -> str:
        return ", ".join(f"{name} v{version}" for name, version in sorted(self.records))


class EnsembleLoader:
    """Builds the serving ensemble from the registry's active models, reusing already-loaded versions."""

    def __init__(self, registry: ModelRegistry, model_dir: Path, threshold: float = 0.5, shards: int = 1) -> None:
        self.registry = registry
        self.model_dir = Path(model_dir)
        self.threshold = threshold
        self.shards = shards
        self._cache: dict[int, Assessor] = {}

    def load(self) -> ServingEnsemble:
        records = self.registry.active_models()
        if not records:
            raise NoActiveModel("no active model in the registry: train one with `coilguard train … --register`")
        members, by_key = [], {}
        for record in sorted(records, key=lambda r: r.name):
            assessor = self._cache.get(record.id) or load_model(record, self.model_dir)
            members.append(Member(assessor))
            by_key[(record.name, record.version)] = record
        self._cache = {r.id: m.assessor for r, m in zip(sorted(records, key=lambda r: r.name), members, strict=True)}
        return ServingEnsemble(Ensemble(members, self.threshold, self.shards), by_key)


# ----------------------------------------------------------------------------- one batch


class AssessCoils:
    def __init__(
        self,
        store: CoilStore,
        topics: Topics,
        *,
        max_payload_bytes: int = 1 << 20,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.topics = topics
        self.max_payload_bytes = max_payload_bytes
        self.clock = clock

    def process(self, messages: Sequence[RawMessage], serving: ServingEnsemble) -> BatchResult:
        """Prepare and commit one batch (the worker runs the two halves on two threads)."""
        return self.commit(self.prepare(messages, serving))

    def prepare(
        self, messages: Sequence[RawMessage], serving: ServingEnsemble, announced: Container[str] = ()
    ) -> Prepared:
        """Everything before the write: parse, reject, drop coils already decided, and let the ensemble vote.

        ``announced``: coils whose decision has gone out to the broker (confirmed, or awaiting its confirmation)
        although the store may not say so yet (the mark is written with the next batch): a coil sent again
        meanwhile is a duplicate, not a coil to announce once more."""
        result = BatchResult()
        parsed: list[tuple[RawMessage, CoilMessage, list[np.ndarray]]] = []
        for raw in messages:
            line = self.topics.line_of(raw.topic)
            try:
                coil = parse_coil_message(raw.payload, topic_line=line, max_bytes=self.max_payload_bytes)
                images = _decode_images(coil) if serving.ensemble.needs_images else []
                if not images and not serving.ensemble.judges_matrices:  # every member would abstain
                    why = NO_ONE_TO_JUDGE if serving.ensemble.needs_images else NO_MODEL_VOTES
                    raise RejectedMessage(why, "images", coil.coil_id)
            except RejectedMessage as exc:
                self._reject(result, raw, exc, line)
                continue
            parsed.append((raw, coil, images))

        ids = list(dict.fromkeys(coil.coil_id for _, coil, _ in parsed))
        stored = self.store.decided(ids, with_matrix=True) if ids else {}
        fresh: dict[str, tuple[RawMessage, CoilMessage, list[np.ndarray]]] = {}
        answered: set[str] = set()  # stored coils whose copy in this batch has been dealt with
        for raw, coil, images in parsed:
            coil_id, known = coil.coil_id, stored.get(coil.coil_id)
            first = fresh[coil_id][1] if coil_id in fresh else None
            if known is not None and (why := _reused(coil.line, coil.thickness, known.line, known.matrix)) is not None:
                why += f" (decided at {known.decided_at:%Y-%m-%d %H:%M:%S} UTC){OWN_ID}"
                self._reject(result, raw, RejectedMessage(why, "coil_id", coil_id), self.topics.line_of(raw.topic))
            elif first is not None and (why := _reused(coil.line, coil.thickness, first.line, first.thickness)):
                why += f" earlier in this batch{OWN_ID}"
                self._reject(result, raw, RejectedMessage(why, "coil_id", coil_id), self.topics.line_of(raw.topic))
            elif known is None and first is None:
                fresh[coil_id] = (raw, coil, images)
            elif known is None or coil_id in answered or known.published or coil_id in announced:
                answered.add(coil_id)
                result.duplicates.append(coil_id)
            else:  # decided before a crash, never announced: announce the stored decision
                answered.add(coil_id)
                result.republished.append(coil_id)
                self._queue_decision(result, _decision_from_stored(known), new=False)
        prepared = Prepared(result, model_ids=serving.model_ids)
        if fresh:
            self._assess(prepared, list(fresh.values()), serving)
        return prepared

    def _assess(
        self,
        prepared: Prepared,
        items: list[tuple[RawMessage, CoilMessage, list[np.ndarray]]],
        serving: ServingEnsemble,
    ) -> None:
        ensemble = serving.ensemble
        images = [decoded for _, _, decoded in items] if ensemble.needs_images else None
        batch = AssessBatch(np.stack([coil.thickness for _, coil, _ in items]), images)
        decisions = ensemble.assess(batch)
        decided_at = self.clock()
        for (raw, coil, _), decision in zip(items, decisions, strict=True):
            prepared.assessed.append(
                AssessedCoil(
                    coil_id=coil.coil_id,
                    line=coil.line,
                    produced_at=coil.produced_at,
                    received_at=datetime.fromtimestamp(raw.received_at, UTC),
                    decided_at=decided_at,
                    label=decision.label,
                    p_nok=decision.p_nok,
                    confidence=decision.confidence,
                    matrix=coil.thickness,
                    product=coil.product.model_dump(exclude_none=True) if coil.product else None,
                    votes=decision.votes,
                )
            )
            prepared.decisions.append(decision)
            prepared.messages[coil.coil_id] = raw

    def merge(self, parts: list[Prepared]) -> Prepared:
        """A batch prepared one message at a time (after it broke the ensemble), put together as :meth:`prepare`
        would have: each part met no other copy of its coil, so a second copy of a coil is a duplicate, another
        coil under the same id is refused, and a stored decision is announced again once."""
        kept: list[Prepared] = []
        first: dict[str, AssessedCoil] = {}
        announced_again: set[str] = set()
        for part in parts:
            for coil in part.assessed:
                if (earlier := first.get(coil.coil_id)) is None:
                    first[coil.coil_id] = coil
                    continue
                raw = part.messages[coil.coil_id]
                part.assessed, part.decisions = [], []  # a part of one message: nothing else in it
                if (why := _reused(coil.line, coil.matrix, earlier.line, earlier.matrix)) is not None:
                    error = RejectedMessage(f"{why} earlier in this batch{OWN_ID}", "coil_id", coil.coil_id)
                    self._reject(part.result, raw, error, self.topics.line_of(raw.topic))
                else:
                    part.result.duplicates.append(coil.coil_id)
            for coil_id in list(part.result.republished):
                if coil_id in announced_again:  # its stored decision goes out with the first copy
                    part.result.republished.remove(coil_id)
                    part.result.publish = [o for o in part.result.publish if o.coil_id != coil_id]
                    part.result.duplicates.append(coil_id)
                announced_again.add(coil_id)
            kept.append(part)
        return Prepared.merge(kept)

    def commit(self, prepared: Prepared, published: Sequence[str] = ()) -> BatchResult:
        """The write: one transaction for the batch's coils and votes (and the marks of ``published``
        decisions of earlier batches); then what to announce."""
        result = prepared.result
        inserted = self.store.save_assessed(prepared.assessed, prepared.model_ids, published)
        reused: dict[str, str] = {}
        if len(inserted) < len(prepared.assessed):
            ours, reused = self._stored_meanwhile(prepared, inserted)
            inserted |= ours
        for record, decision in zip(prepared.assessed, prepared.decisions, strict=True):
            if record.coil_id in reused:  # another coil under this id, stored by another replica while this voted
                raw = prepared.messages[record.coil_id]
                error = RejectedMessage(reused[record.coil_id], "coil_id", record.coil_id)
                self._reject(result, raw, error, self.topics.line_of(raw.topic))
            elif record.coil_id not in inserted:  # another replica got there first; it announces
                result.duplicates.append(record.coil_id)
            else:
                latency_ms = (record.decided_at - record.received_at).total_seconds() * 1000.0
                self._queue_decision(result, _decision(record, decision, latency_ms))
        return result

    def _stored_meanwhile(self, prepared: Prepared, inserted: set[str]) -> tuple[set[str], dict[str, str]]:
        """Of the coils this batch could not insert: those stored by this very batch (a commit tried again because
        its first try's answer was lost, the connection broken during COMMIT, although the server had committed
        it), still this worker's to announce; and those another replica stored first with other readings or on
        another line, with why they are refused. A coil another replica decided carries that replica's decision
        time, not this batch's; a true copy of it is a duplicate."""
        ours = {r.coil_id: r for r in prepared.assessed if r.coil_id not in inserted}
        mine, reused = set(), {}
        for coil_id, stored in self.store.decided(list(ours), with_matrix=True).items():
            record = ours[coil_id]
            if not stored.published and stored.decided_at == record.decided_at:
                mine.add(coil_id)
            elif (why := _reused(record.line, record.matrix, stored.line, stored.matrix)) is not None:
                reused[coil_id] = f"{why} (decided at {stored.decided_at:%Y-%m-%d %H:%M:%S} UTC){OWN_ID}"
        return mine, reused

    def _queue_decision(self, result: BatchResult, decision: Decision, *, new: bool = True) -> None:
        if new:
            result.decided.append(decision)
        result.publish.append(
            Outgoing(self.topics.decisions(decision.line), dumps(decision), decision.coil_id, decision.line)
        )

    def _reject(self, result: BatchResult, raw: RawMessage, error: RejectedMessage, line: str | None) -> None:
        rejection = Rejection.of(error, raw.payload, datetime.fromtimestamp(raw.received_at, UTC))
        result.rejected.append(rejection)
        result.publish.append(Outgoing(self.topics.rejected(line), dumps(rejection)))
        log.warning("rejected message on %s: %s", raw.topic, error, extra={"coil_id": error.coil_id})


def _votes(votes: Sequence[MemberVote]) -> list[Vote]:
    return [
        Vote(model=v.model, version=v.version, label=v.label, p_nok=v.p_nok, confidence=v.confidence) for v in votes
    ]  # type: ignore[arg-type]


def _decision(coil: AssessedCoil, decision: EnsembleDecision, latency_ms: float) -> Decision:
    return Decision(
        coil_id=coil.coil_id,
        line=coil.line,
        decision=decision.label,  # type: ignore[arg-type]
        p_nok=decision.p_nok,
        confidence=decision.confidence,
        votes=_votes(decision.votes),
        decided_at=coil.decided_at,
        latency_ms=round(latency_ms, 3),
    )


def stored_announcements(store: CoilStore, topics: Topics, coil_ids: Sequence[str]) -> list[Outgoing]:
    """The decisions of ``coil_ids`` as they were stored, ready to be announced again (``coilguard announce``), in
    the order asked; not those announced meanwhile (a worker's redelivered copy, a held decision the broker took)."""
    decided = store.decided(coil_ids)
    return [
        Outgoing(topics.decisions(stored.line), dumps(_decision_from_stored(stored)), stored.coil_id, stored.line)
        for stored in (decided[coil_id] for coil_id in coil_ids if coil_id in decided)
        if not stored.published
    ]


OWN_ID = ": each coil needs an id of its own; this one is not assessed"


def _reused(line: str, matrix: np.ndarray, known_line: str, known: np.ndarray | None) -> str | None:
    """Why a coil on ``line`` read as ``matrix`` is not the coil already known by its id (on ``known_line``, read
    as ``known``), or None when it is.

    A copy of a coil (QoS 1 redelivery, a gateway sending again after a restart) is a duplicate and goes
    unanswered. Another coil under a used id (a gateway whose counter started over, two lines numbering alike)
    would go the same way, and its readings never be judged: it is refused, saying so."""
    if line != known_line:
        return f"coil id already used by a coil of line {known_line!r}"
    if known is not None and not np.array_equal(matrix, known, equal_nan=True):
        return "coil id already used by a coil with other readings"
    return None


def _decision_from_stored(stored: StoredDecision) -> Decision:
    """A decision announced again (its first announcement was lost with a worker) says what the first would have
    said, its latency included: a dashboard must not read 0 ms for a coil decided before a crash."""
    latency_ms = (stored.decided_at - stored.received_at).total_seconds() * 1000.0 if stored.received_at else 0.0
    return Decision(
        coil_id=stored.coil_id,
        line=stored.line,
        decision=stored.label,  # type: ignore[arg-type]
        p_nok=stored.p_nok,
        confidence=stored.confidence,
        votes=_votes(stored.votes),
        decided_at=stored.decided_at,
        latency_ms=round(latency_ms, 3),
    )


def _decode_images(coil: CoilMessage) -> list[np.ndarray]:
    """The pixels, for image assessors; the parser has already checked the base64, the format's signature and
    the header, so what is left to refuse here is a file that PIL cannot read, or one too large to decode at all
    (the field names which one).

    A message's images are decoded to at most ``MAX_DECODED_PIXELS`` together: the small ones as they are, the
    large ones scaled down to a fair share of what is left (:func:`decoded_shares`, ``fit_within``). A blank
    8192 × 8192 PNG is 65 kB, so the 1 MiB limit lets eleven through, and at full size they would take 2.8 GB of
    float32 until the ensemble had voted (a batch of them killed the worker, and the redelivered batch again).
    The assessors resize to 512 px at most anyway.

    Only surface images are decoded: another kind (a gateway's edge camera, say) was checked by the parser, and
    no assessor judges it."""
    surface = [(i, image) for i, image in enumerate(coil.images) if image.kind == SURFACE]
    for kind in {image.kind for image in coil.images} - {SURFACE} - _KINDS_SEEN:
        if len(_KINDS_SEEN) >= 64:  # a gateway inventing kinds must not grow the set and the log without end
            break
        _KINDS_SEEN.add(kind)
        log.warning("images of kind %r are not judged (the image assessors judge %r ones); said once", kind, SURFACE)
    for i, image in surface:
        if image.size is None or (image.format == "png" and image.pixels > MAX_SOURCE_PIXELS):
            raise RejectedMessage(
                f"an image of {_megapixels(image.pixels)} is more than an image assessor decodes "
                f"({_megapixels(MAX_SOURCE_PIXELS)} for a PNG, decoded in full before it is reduced)",
                f"images.{i}",
                coil.coil_id,
            )
    shares = decoded_shares([image.pixels for _, image in surface], MAX_DECODED_PIXELS)
    decoded: list[np.ndarray] = []
    for (i, image), share in zip(surface, shares, strict=True):
        assert image.size is not None  # refused above
        target = fit_within(image.size, share)
        try:
            decoded.append(decode_image(image.decode(), None if target == image.size else target))
        except ValueError as exc:
            raise RejectedMessage(str(exc), f"images.{i}", coil.coil_id) from None
    return decoded


_KINDS_SEEN: set[str] = set()  # image kinds other than surface already named in the log


def decoded_shares(pixels: list[int], budget: int) -> list[float]:
    """Each image's most pixels once decoded, ``budget`` in all: an image under an equal share of what the
    smaller ones leave keeps its size; the others share the rest equally (a 200 px crop beside a 5 Mpx frame
    is not halved with it)."""
    shares = [float(p) for p in pixels]
    left, order = float(budget), sorted(range(len(pixels)), key=pixels.__getitem__)
    for rank, i in enumerate(order):
        fair = left / (len(pixels) - rank)
        if pixels[i] > fair:
            for j in order[rank:]:
                shares[j] = fair
            break
        left -= pixels[i]
    return shares


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.0f} Mpx" if n < OVER_PIL_LIMIT else f"over {(OVER_PIL_LIMIT - 1) / 1e6:.0f} Mpx"


def summary(result: BatchResult) -> dict[str, Any]:
    return {
        "decided": len(result.decided),
        "republished": len(result.republished),
        "duplicates": len(result.duplicates),
        "rejected": len(result.rejected),
    }
