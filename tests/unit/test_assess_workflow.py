"""AssessCoils batch logic over an in-memory store: decided once, rejected with a reason, never stopped."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pytest

from ml.assessors.base import AssessBatch
from ml.ensemble import Ensemble, Member
from workflows.assess import MAX_DECODED_PIXELS, AssessCoils, RawMessage, ServingEnsemble
from workflows.messages import encode_coil_message
from workflows.ports import AssessedCoil, ModelRecord, StoredDecision
from workflows.topics import Topics

if TYPE_CHECKING:
    from services.workers.assess import AssessWorker

TOPICS = Topics("cg")


class MemoryStore:
    def __init__(self) -> None:
        self.coils: dict[str, AssessedCoil] = {}
        self.published: set[str] = set()
        self.votes: list[tuple[str, int]] = []

    def decided(self, coil_ids: Sequence[str], with_matrix: bool = False) -> dict[str, StoredDecision]:
        return {
            c.coil_id: StoredDecision(
                c.coil_id,
                c.line,
                c.label,
                c.p_nok,
                c.confidence,
                c.decided_at,
                c.coil_id in self.published,
                c.votes,
                c.received_at,
                c.matrix if with_matrix else None,
            )
            for cid in coil_ids
            if (c := self.coils.get(cid))
        }

    def save_assessed(
        self, coils: Sequence[AssessedCoil], model_ids: dict[tuple[str, int], int], published: Sequence[str] = ()
    ) -> set[str]:
        self.mark_published(published)
        inserted = set()
        for coil in coils:
            if coil.coil_id not in self.coils:
                self.coils[coil.coil_id] = coil
                inserted.add(coil.coil_id)
                self.votes += [(coil.coil_id, model_ids[(v.model, v.version)]) for v in coil.votes]
        return inserted

    def mark_published(self, coil_ids: Sequence[str]) -> None:
        self.published.update(coil_ids)


class Thinness:
    """NOK when the coil's thinnest reading is under 100 g/m²."""

    consumes = "matrix"
    name, version = "thin", 4

    def predict(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray]:
        p = np.where(np.nanmin(batch.matrices, axis=(1, 2)) < 100, 0.9, 0.1).astype(np.float32)
        return p, np.maximum(p, 1 - p)


@pytest.fixture
def serving() -> ServingEnsemble:
    return _serving(Thinness())


def _serving(assessor: Thinness) -> ServingEnsemble:
    """``assessor`` alone in the ensemble, registered as model id 17."""
    record = ModelRecord(id=17, name="thin", kind="thin", version=4, status="active", artifact_uri="", sha256="")
    return ServingEnsemble(Ensemble([Member(assessor)]), {("thin", 4): record})  # type: ignore[arg-type]


def _worker(tmp_path: Path) -> AssessWorker:
    """An AssessWorker on SQLite and the embedded broker, never started: its batch methods are called directly."""
    from services.config import load_settings
    from services.workers.assess import AssessWorker

    settings = load_settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'cg.db'}", mqtt_url="embedded")
    return AssessWorker(settings, client_id="test")


def _coil(coil_id: str, thin: bool = False, line: str = "galv-1") -> RawMessage:
    m = np.full((264, 18), 140.0, np.float32)
    if thin:
        m[100:120, 4] = 80.0
    payload = encode_coil_message(coil_id, line, datetime(2026, 11, 23, tzinfo=UTC), m)
    return RawMessage(TOPICS.sensors(line), payload, time.time())


def test_a_batch_decides_stores_every_vote_and_announces(serving: ServingEnsemble) -> None:
    store = MemoryStore()
    result = AssessCoils(store, TOPICS).process([_coil("A"), _coil("B", thin=True)], serving)
    assert [(d.coil_id, d.decision) for d in result.decided] == [("A", "OK"), ("B", "NOK")]
    assert store.votes == [("A", 17), ("B", 17)]
    assert [o.topic for o in result.publish] == ["cg/decisions/galv-1"] * 2
    doc = orjson.loads(result.publish[1].payload)
    assert doc["votes"] == [
        {"model": "thin", "version": 4, "label": "NOK", "p_nok": pytest.approx(0.9), "confidence": pytest.approx(0.9)}
    ]
    assert doc["latency_ms"] >= 0


def test_a_coil_is_decided_once(serving: ServingEnsemble) -> None:
    store = MemoryStore()
    workflow = AssessCoils(store, TOPICS)
    first = workflow.process([_coil("A"), _coil("A")], serving)
    assert len(first.decided) == 1 and first.duplicates == ["A"]
    store.mark_published(first.to_mark_published)
    again = workflow.process([_coil("A")], serving)  # a QoS 1 redelivery
    assert again.decided == [] and again.duplicates == ["A"] and again.publish == []
    assert store.coils["A"].label == "OK" and len(store.votes) == 1


def test_another_coil_under_a_used_id_is_refused_saying_so(serving: ServingEnsemble) -> None:
    """A gateway whose counter started over, or two lines numbering alike: the new coil was dropped as a copy
    of the old one, silently, and its readings never judged. It is refused on the rejected topic, the stored
    decision untouched; a true copy is still a quiet duplicate."""
    store = MemoryStore()
    workflow = AssessCoils(store, TOPICS)
    first = workflow.process([_coil("A"), _coil("A", thin=True), _coil("A")], serving)
    assert [d.coil_id for d in first.decided] == ["A"] and first.duplicates == ["A"]
    [in_batch] = first.rejected
    assert (in_batch.coil_id, in_batch.field) == ("A", "coil_id") and "other readings earlier in this batch" in (
        in_batch.reason
    )
    store.mark_published(first.to_mark_published)
    later = workflow.process([_coil("A", thin=True), _coil("A", line="galv-2"), _coil("A")], serving)
    assert later.decided == [] and later.duplicates == ["A"]
    assert [(r.coil_id, r.field) for r in later.rejected] == [("A", "coil_id")] * 2
    assert "with other readings (decided at " in later.rejected[0].reason
    assert "used by a coil of line 'galv-1'" in later.rejected[1].reason
    assert [o.topic for o in later.publish] == ["cg/rejected/galv-1", "cg/rejected/galv-2"]
    assert store.coils["A"].label == "OK" and store.coils["A"].line == "galv-1" and len(store.votes) == 1


def test_a_coil_sent_again_before_its_mark_is_written_is_not_announced_twice(serving: ServingEnsemble) -> None:
    """The worker writes "published" with the next batch; a gateway's QoS 1 resend can come first."""
    store = MemoryStore()
    workflow = AssessCoils(store, TOPICS)
    first = workflow.process([_coil("A")], serving)  # announced and confirmed; the mark not yet written
    again = workflow.commit(workflow.prepare([_coil("A")], serving, announced=first.to_mark_published))
    assert again.duplicates == ["A"] and again.republished == [] and again.publish == []


def test_a_decision_stored_but_never_announced_is_announced_on_redelivery(serving: ServingEnsemble) -> None:
    store = MemoryStore()
    workflow = AssessCoils(store, TOPICS)
    first = workflow.process([_coil("B", thin=True)], serving)  # crash here: committed, never published
    again = workflow.process([_coil("B", thin=True)], serving)
    assert again.decided == [] and again.republished == ["B"]
    announced = orjson.loads(again.publish[0].payload)
    assert announced["decision"] == "NOK"
    assert announced["latency_ms"] == orjson.loads(first.publish[0].payload)["latency_ms"] > 0  # not a false 0 ms
    assert len(store.votes) == 1


def test_a_batch_whose_commit_answer_was_lost_is_announced_when_written_again(serving: ServingEnsemble) -> None:
    """The server committed, the connection broke before it could say so, and the worker writes the batch again:
    its coils are on record now, and still this worker's to announce. A coil another replica decided in between
    carries that replica's decision time and stays that replica's to announce; another coil a replica stored under
    an id of this batch meanwhile (other readings) is refused, not taken for a copy."""

    class AnswerLost(MemoryStore):
        lost = True

        def save_assessed(self, coils, model_ids, published=()):  # type: ignore[no-untyped-def]
            inserted = super().save_assessed(coils, model_ids, published)
            if self.lost:
                self.lost = False
                raise ConnectionError("server closed the connection unexpectedly")  # as COMMIT's answer was due
            return inserted

    store = AnswerLost()
    ours = AssessCoils(store, TOPICS)
    prepared = ours.prepare([_coil("A"), _coil("X", thin=True), _coil("Y", thin=True)], serving)
    store.lost = False
    other = AssessCoils(store, TOPICS, clock=lambda: datetime(2026, 11, 23, 5, tzinfo=UTC))
    other.process([_coil("X", thin=True), _coil("Y")], serving)
    store.lost = True
    with pytest.raises(ConnectionError):
        ours.commit(prepared)
    again = ours.commit(prepared)
    assert [d.coil_id for d in again.decided] == ["A"] and again.duplicates == ["X"]
    [reused] = again.rejected
    assert (reused.coil_id, reused.field) == ("Y", "coil_id") and "with other readings" in reused.reason
    assert [o.topic for o in again.publish] == ["cg/decisions/galv-1", "cg/rejected/galv-1"]
    assert orjson.loads(again.publish[0].payload)["coil_id"] == "A"
    # the other replica's decisions stand
    assert store.coils["X"].decided_at == store.coils["Y"].decided_at == datetime(2026, 11, 23, 5, tzinfo=UTC)
    assert store.coils["Y"].label == "OK" and len(store.votes) == 3


def test_bad_messages_are_rejected_on_their_line_and_the_batch_goes_on(serving: ServingEnsemble) -> None:
    store = MemoryStore()
    batch = [
        RawMessage(TOPICS.sensors("galv-2"), b"{not json", time.time()),
        _coil("OK-1"),
        RawMessage(TOPICS.sensors("galv-1"), orjson.dumps({"schema": 1, "coil_id": "X"}), time.time()),
        _coil("OK-2", line="galv-3"),
    ]
    result = AssessCoils(store, TOPICS).process(batch, serving)
    assert {d.coil_id for d in result.decided} == {"OK-1", "OK-2"}
    assert [r.coil_id for r in result.rejected] == [None, "X"]
    topics = [o.topic for o in result.publish]
    assert "cg/rejected/galv-2" in topics and "cg/rejected/galv-1" in topics and "cg/decisions/galv-3" in topics
    assert orjson.loads(next(o.payload for o in result.publish if o.topic == "cg/rejected/galv-2"))[
        "reason"
    ].startswith("invalid JSON")


def test_an_image_that_is_not_base64_is_rejected_with_no_image_model_active(serving: ServingEnsemble) -> None:
    assert not serving.ensemble.needs_images  # so the workflow itself never decodes images
    m = np.full((264, 18), 140.0, np.float32)
    image = {"kind": "surface", "format": "png", "data_b64": "!!!!"}
    payload = encode_coil_message("I", "galv-1", datetime(2026, 11, 23, tzinfo=UTC), m, images=[image])
    result = AssessCoils(MemoryStore(), TOPICS).process([RawMessage(TOPICS.sensors("galv-1"), payload, 0.0)], serving)
    assert result.decided == [] and [(r.coil_id, r.field) for r in result.rejected] == [("I", "images.0.data_b64")]
    rejection = orjson.loads(next(o.payload for o in result.publish if o.topic == "cg/rejected/galv-1"))
    assert rejection["reason"] == "not valid base64" and rejection["field"] == "images.0.data_b64"


def test_a_message_that_breaks_the_ensemble_is_rejected_with_its_coil_and_arrival(tmp_path: Path) -> None:
    """The worker's last resort (a message that parsed but broke a model): the rejection still names the coil
    and when it arrived, as DESIGN §3's rejected payload has them."""
    worker = _worker(tmp_path)
    raw = RawMessage(TOPICS.sensors("galv-1"), _coil("C-broke").payload, 1_790_000_000.0)
    [rejection] = worker._unassessable(raw, RuntimeError("boom"), {}).result.rejected
    assert rejection.coil_id == "C-broke" and rejection.reason == "could not be assessed: RuntimeError: boom"
    assert rejection.received_at == datetime.fromtimestamp(1_790_000_000.0, UTC)
    worker.engine.dispose()


class BreaksOnThick(Thinness):
    """Raises on a coil above 300 g/m² everywhere, as a model with a bug on such input would."""

    def predict(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray]:
        if (np.nanmin(batch.matrices, axis=(1, 2)) > 300).any():
            raise RuntimeError("boom")
        return super().predict(batch)


def test_a_coil_that_breaks_a_model_mid_batch_is_rejected_and_the_others_are_decided(tmp_path: Path) -> None:
    """The worker isolates the message at fault; the batch's other rejections and the other coils' decisions
    survive it, and the batch commits with every vote naming its model."""
    from services.mqtt.client import Inbound

    thick = encode_coil_message(
        "C-thick", "galv-1", datetime(2026, 11, 23, tzinfo=UTC), np.full((264, 18), 320.0, np.float32)
    )
    raws = [  # the coil at fault first: the merged batch must still know every model's id
        RawMessage(TOPICS.sensors("galv-1"), thick, time.time()),
        _coil("C-1"),
        RawMessage(TOPICS.sensors("galv-1"), b"{not json", time.time()),
        _coil("C-2", thin=True),
    ]
    worker = _worker(tmp_path)
    store = MemoryStore()
    worker.workflow = AssessCoils(store, TOPICS)
    worker._serving = _serving(BreaksOnThick())
    _, prepared, _ = worker._prepare([Inbound(r.topic, r.payload, mid=i, qos=1) for i, r in enumerate(raws)])
    result = worker.workflow.commit(prepared)
    assert [(d.coil_id, d.decision) for d in result.decided] == [("C-1", "OK"), ("C-2", "NOK")]
    assert sorted(str(r.coil_id) for r in result.rejected) == ["C-thick", "None"]
    assert (
        next(r for r in result.rejected if r.coil_id == "C-thick").reason == "could not be assessed: RuntimeError: boom"
    )
    assert store.votes == [("C-1", 17), ("C-2", 17)]
    worker.engine.dispose()


class PoolExhausted(MemoryStore):
    """Every pooled connection taken for the first ``times`` look-ups (the API sharing the engine in `coilguard
    up`, its requests stuck): SQLAlchemy's pool timeout, which is no driver error."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    def decided(self, coil_ids: Sequence[str], with_matrix: bool = False) -> dict[str, StoredDecision]:
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        if self.times:
            self.times -= 1
            raise PoolTimeout("QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00")
        return super().decided(coil_ids, with_matrix)


def test_a_pool_with_no_free_connection_is_waited_out_not_blamed_on_the_coils(tmp_path: Path) -> None:
    """Was: the batch's messages rejected one by one as "could not be assessed: TimeoutError" and acknowledged,
    the coils lost."""
    from services.mqtt.client import Inbound

    worker = _worker(tmp_path)
    worker.workflow = AssessCoils(PoolExhausted(times=2), TOPICS)
    worker._serving = _serving(Thinness())
    batch = [Inbound(r.topic, r.payload, mid=i, qos=1) for i, r in enumerate([_coil("C-1"), _coil("C-2", True)])]
    _, prepared, _ = worker._prepare(batch)
    assert not prepared.result.rejected
    assert [c.coil_id for c in prepared.assessed] == ["C-1", "C-2"]
    worker.engine.dispose()


def test_a_message_whose_line_differs_from_its_topic_is_rejected(serving: ServingEnsemble) -> None:
    raw = _coil("C")
    moved = RawMessage(TOPICS.sensors("galv-9"), raw.payload, raw.received_at)
    result = AssessCoils(MemoryStore(), TOPICS).process([moved], serving)
    assert result.decided == [] and result.rejected[0].field == "line"


def test_the_worker_remembers_only_its_most_recent_confirmed_coils() -> None:
    from services.workers.assess import RecentCoils

    recent = RecentCoils(3)
    recent.add_all(["A", "B", "C"])
    recent.add_all(["A", "D"])  # A is refreshed, B (now the oldest) goes
    assert [c in recent for c in "ABCD"] == [True, False, True, True]


class Brightness:
    """An image model: NOK when the coil's first surface image is dark; abstains on a coil without images."""

    consumes = "image"
    can_vote = True
    name, version = "thin", 4

    def predict(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray]:
        assert batch.images is not None
        p = np.array([np.nan if not imgs else 0.9 if imgs[0].mean() < 100 else 0.1 for imgs in batch.images])
        return p, np.where(np.isnan(p), np.nan, np.maximum(p, 1 - p))


def test_with_image_models_only_a_coil_without_images_is_rejected_with_its_reason() -> None:
    """Every member would abstain on it: the coil is rejected, naming what to do, and the batch goes on (it
    used to fail the whole batch, each coil then re-run alone and rejected as 'could not be assessed')."""
    serving = _serving(Brightness())  # type: ignore[arg-type]
    with_images = _with_image(_coil("A"))
    result = AssessCoils(MemoryStore(), TOPICS).process([_coil("B"), with_images], serving)
    assert [d.coil_id for d in result.decided] == ["A"]
    [rejected] = result.rejected
    assert (rejected.coil_id, rejected.field) == ("B", "images")
    assert "every active model assesses images" in rejected.reason


def test_with_only_models_that_never_vote_a_coil_is_rejected_for_that_not_for_its_images() -> None:
    """A classifier of defect types alone (registered by an older release) abstains on every coil: its images are
    not decoded for nothing, and the reason names the model, not the coil's "missing" images."""

    class TypesOnly(Brightness):
        can_vote = False

    serving = _serving(TypesOnly())  # type: ignore[arg-type]
    assert not serving.ensemble.needs_images
    [rejected] = AssessCoils(MemoryStore(), TOPICS).process([_with_image(_coil("A"))], serving).rejected
    assert rejected.field == "images" and "no active model gives a coil its NOK probability" in rejected.reason


def _with_image(raw: RawMessage, side: int = 8, count: int = 1, shade: int = 200) -> RawMessage:
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("L", (side, side), shade).save(png, format="PNG")
    doc = orjson.loads(raw.payload)
    image = {"kind": "surface", "format": "png", "data_b64": base64.b64encode(png.getvalue()).decode()}
    doc["images"] = [image] * count
    return RawMessage(raw.topic, orjson.dumps(doc), raw.received_at)


def test_an_image_of_another_kind_is_not_judged_as_a_surface(
    serving: ServingEnsemble, caplog: pytest.LogCaptureFixture
) -> None:
    """An image assessor knows surfaces: a gateway's other camera (an edge view) beside the surface is checked
    and left out, and a coil with nothing but such images is one no image model can judge."""
    import base64

    sizes = Sizes()
    surface = _with_image(_coil("S"), side=8)
    doc = orjson.loads(surface.payload)
    doc["images"] = [{**doc["images"][0], "kind": "edge", "data_b64": base64.b64encode(_png_header(5, 7)).decode()}]
    edge_only = RawMessage(surface.topic, orjson.dumps({**doc, "coil_id": "E"}), surface.received_at)
    doc["images"].append(orjson.loads(surface.payload)["images"][0])
    both = RawMessage(surface.topic, orjson.dumps({**doc, "coil_id": "B"}), surface.received_at)
    result = AssessCoils(MemoryStore(), TOPICS).process([both, edge_only], _serving(sizes))
    assert [d.coil_id for d in result.decided] == ["B"] and sizes.shapes == [[(8, 8)]]
    assert [(r.coil_id, r.field) for r in result.rejected] == [("E", "images")]
    said = [r.getMessage() for r in caplog.records if "are not judged" in r.getMessage()]
    assert said == ["images of kind 'edge' are not judged (the image assessors judge 'surface' ones); said once"]


class Sizes(Brightness):
    """Records the decoded images' shapes."""

    def __init__(self) -> None:
        self.shapes: list[list[tuple[int, ...]]] = []

    def predict(self, batch: AssessBatch) -> tuple[np.ndarray, np.ndarray]:
        self.shapes += [[im.shape for im in imgs] for imgs in batch.images or []]
        return super().predict(batch)


def test_huge_surface_images_are_decoded_reduced_and_ignored_without_an_image_model(serving: ServingEnsemble) -> None:
    """A camera fault sending blank frames (a blank 8192² PNG is 65 kB: eleven pass the 1 MiB limit) would
    decode to gigabytes of float32 a coil, and a batch of them killed the worker on every redelivery. The images of
    a message are decoded to 4 Mpx together at most; ordinary ones untouched; with no image model, not decoded."""
    huge = _with_image(_coil("H"), side=4096, count=3, shade=0)
    assert len(huge.payload) < 1 << 20
    sizes = Sizes()
    result = AssessCoils(MemoryStore(), TOPICS).process([huge, _with_image(_coil("S"), side=200)], _serving(sizes))
    assert [d.coil_id for d in result.decided] == ["H", "S"] and not result.rejected
    side = math.floor(4096 * math.sqrt(MAX_DECODED_PIXELS / 3 / 4096**2))  # a third of the budget each
    assert sizes.shapes == [[(side, side)] * 3, [(200, 200)]] and 3 * side**2 <= MAX_DECODED_PIXELS
    plain = AssessCoils(MemoryStore(), TOPICS).process([huge], serving)  # no image model: the images are not read
    assert [d.coil_id for d in plain.decided] == ["H"] and not plain.rejected


def _png_header(width: int, height: int) -> bytes:
    """A PNG that is all header (no pixel data): enough for PIL to read its size, which is what is tested."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def _with_files(raw: RawMessage, *files: tuple[bytes, str]) -> RawMessage:
    import base64

    doc = orjson.loads(raw.payload)
    doc["images"] = [{"format": fmt, "data_b64": base64.b64encode(data).decode()} for data, fmt in files]
    return RawMessage(raw.topic, orjson.dumps(doc), raw.received_at)


def test_large_images_share_the_budget_and_one_too_large_to_decode_is_refused_only_by_an_image_model(
    serving: ServingEnsemble,
) -> None:
    """The small image beside a large one keeps its size and the large one gets the rest; a JPEG is reduced by
    its decoder and then to its share exactly; a strip one pixel wide is shortened; a PNG over 16.7 Mpx (decoded
    in full before any reduction) or any image over what PIL opens at all refuses the coil, with the reason, only
    where an image model would decode it."""
    import io

    from PIL import Image

    def encoded(side: int, fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.new("L", (side, side), 90).save(buffer, format=fmt)
        return buffer.getvalue()

    strip = io.BytesIO()
    Image.new("L", (1, 4_000_000), 90).save(strip, format="PNG")  # over a fair share: it cannot narrow
    files = (encoded(200, "PNG"), "png"), (encoded(4096, "JPEG"), "jpeg"), (strip.getvalue(), "png")
    sizes = Sizes()
    result = AssessCoils(MemoryStore(), TOPICS).process([_with_files(_coil("M"), *files)], _serving(sizes))
    assert [d.coil_id for d in result.decided] == ["M"]
    [[small, large, thin]] = sizes.shapes
    share = (MAX_DECODED_PIXELS - 200**2) / 2
    assert small == (200, 200) and large == (1441, 1441) and thin == (int(share), 1)  # (rows, columns)
    assert math.isqrt(int(share)) == 1441 and 200**2 + 1441**2 + thin[0] <= MAX_DECODED_PIXELS
    for side, words in ((5000, "an image of 25 Mpx is more than"), (20000, "an image of over 179 Mpx")):
        too_large = _with_files(_coil(f"L{side}"), (_png_header(side, side), "png"))
        refused = AssessCoils(MemoryStore(), TOPICS).process([too_large], _serving(Sizes()))
        assert [(r.field, r.reason.startswith(words)) for r in refused.rejected] == [("images.0", True)], refused
        plain = AssessCoils(MemoryStore(), TOPICS).process([too_large], serving)  # nobody decodes it: decided
        assert [d.coil_id for d in plain.decided] == [f"L{side}"] and not plain.rejected


def test_the_bookkeeping_of_held_decisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the worker keeps of decisions the broker refused (the broker's side is tested on Mosquitto in
    test_assess_worker): every message of a held coil is acknowledged once its decision goes out, a copy with
    another id included; a held coil announced again by a later batch is released, not offered a second time;
    a QoS 0 message is not kept; past the limit the oldest are given up, by name."""
    from services.mqtt.client import Inbound
    from workflows.assess import Outgoing

    worker = _worker(tmp_path)
    acked: list[int] = []
    monkeypatch.setattr(worker.client, "ack", lambda message: acked.append(message.mid))
    refusals: list[tuple[int, str]] = []
    monkeypatch.setattr(worker.client, "take_refused", lambda: [refusals.pop() for _ in list(refusals)])

    def message(coil_id: str, mid: int, qos: int = 1) -> Inbound:
        return Inbound(TOPICS.sensors("galv-1"), _coil(coil_id).payload, mid=mid, qos=qos)

    def decision(coil_id: str) -> Outgoing:
        return Outgoing(TOPICS.decisions("galv-1"), b"{}", coil_id, "galv-1")

    assert worker.held_limit == 256 - 2 * 64  # below the receive maximum by two batches
    refusals.append((7, "Not authorized"))  # batch 1: A's decision refused, B's taken
    a1, b = message("A", 1), message("B", 2)
    held, kept = worker._hold_refused({7: decision("A"), 8: decision("B")}, [a1, b])
    assert (held, kept) == ({"A"}, {id(a1)}) and list(worker._held) == ["A"]
    assert worker._held["A"].messages[0].payload == b""  # the id is what an acknowledgement needs
    a3 = message("A", 3)
    held, kept = worker._hold_refused({}, [a3, message("A", 1)])  # batch 2: copies of A, one of them redelivered
    assert held == {"A"} and len(kept) == 2 and [m.mid for m in worker._held["A"].messages] == [1, 3]
    held, kept = worker._hold_refused({9: decision("A")}, [message("A", 4)])  # batch 3: announced again, taken
    assert (held, kept) == (set(), set()) and not worker._held and acked == [1, 3]  # released, each id once

    refusals.append((5, "Not authorized"))
    assert worker._hold_refused({5: decision("Q")}, [message("Q", 0, qos=0)])[0] == {"Q"}
    assert worker._held["Q"].messages == []  # nothing to acknowledge at QoS 0
    worker.held_limit = 2
    for mid, coil_id in ((11, "C"), (12, "D")):
        refusals.append((mid, "Not authorized"))
        worker._hold_refused({mid: decision(coil_id)}, [message(coil_id, mid)])
    assert list(worker._held) == ["C", "D"]  # Q, the oldest, given up
    refusals.append((13, "Not authorized"))
    held, kept = worker._hold_refused({13: decision("E")}, [message("E", 13)])
    assert list(worker._held) == ["D", "E"] and acked == [1, 3, 11]  # C given up: its message acknowledged

    store = MemoryStore()  # E announced meanwhile (`coilguard announce`): released at the next round, not resent
    AssessCoils(store, TOPICS).process([_coil("E")], _serving(Thinness()))
    store.mark_published(["E"])
    worker.store = store
    worker.stopping.set()  # the round's confirmation then ends at once: nothing here answers
    assert worker._retry_held() == [] and list(worker._held) == ["D"] and acked == [1, 3, 11, 13]
    worker.engine.dispose()


def test_held_copies_of_one_coil_count_against_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker's receive maximum counts unacknowledged messages: a gateway that sends a refused line's coil again
    and again (each copy a new message) fills it with one held coil. Was: held coils were counted, so that coil was
    never given up and every line stalled."""
    from services.mqtt.client import Inbound
    from workflows.assess import Outgoing

    worker = _worker(tmp_path)
    acked: list[int] = []
    monkeypatch.setattr(worker.client, "ack", lambda message: acked.append(message.mid))
    refusals = [(7, "Not authorized")]
    monkeypatch.setattr(worker.client, "take_refused", lambda: [refusals.pop() for _ in list(refusals)])
    worker.held_limit = 3
    copies = [Inbound(TOPICS.sensors("galv-1"), _coil("A").payload, mid=m, qos=1) for m in (1, 2, 3)]
    worker._hold_refused({7: Outgoing(TOPICS.decisions("galv-1"), b"{}", "A", "galv-1")}, copies)
    assert list(worker._held) == ["A"] and not acked  # three messages: at the limit, kept
    worker._hold_refused({}, [Inbound(TOPICS.sensors("galv-1"), _coil("A").payload, mid=4, qos=1)])
    assert not worker._held and acked == [1, 2, 3, 4]  # a fourth: given up, every copy acknowledged
    worker.engine.dispose()


def _committing(worker: AssessWorker, store: MemoryStore, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """``worker`` on ``store``, its client answering as a broker that takes everything; what it publishes."""
    from types import SimpleNamespace

    worker.store = store
    worker.workflow = AssessCoils(store, TOPICS)
    worker._serving = _serving(Thinness())
    mids = iter(range(100, 200))
    published: list[bytes] = []

    def publish(topic: str, payload: bytes, qos: int = 1) -> SimpleNamespace:
        published.append(payload)
        return SimpleNamespace(mid=next(mids))

    monkeypatch.setattr(worker.client, "publish", publish)
    monkeypatch.setattr(worker.client, "flush", lambda *args, **kwargs: True)
    monkeypatch.setattr(worker.client, "take_refused", lambda: [])
    monkeypatch.setattr(worker.client, "ack", lambda message: None)
    return published


def _commit_one(worker: AssessWorker, *coil_ids: str) -> None:
    """One batch of ``coil_ids`` through both halves, the committer to its end."""
    from services.mqtt.client import Inbound

    batch = [Inbound(TOPICS.sensors("galv-1"), _coil(c).payload, mid=i, qos=1) for i, c in enumerate(coil_ids)]
    worker._pending.put(worker._prepare(batch))
    worker._pending.put(None)
    worker._commit_batches()


def test_a_copy_met_while_its_first_is_being_stored_is_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two threads: the committer writes batch N, and in that moment the worker thread prepares batch N+1 with
    another copy of one of its coils (the gateway sent it again). The copy finds the coil stored and unmarked; it
    is a duplicate, as batch N's decision is on its way. Was: announced a second time, with no crash at all."""
    from services.mqtt.client import Inbound

    worker = _worker(tmp_path)
    meanwhile: list = []

    class Racing(MemoryStore):
        def save_assessed(self, coils, model_ids, published=()):
            inserted = super().save_assessed(coils, model_ids, published)
            if not meanwhile:  # committed: the worker thread's next batch, a copy of the coil under a new id
                meanwhile.append(worker._prepare([Inbound(TOPICS.sensors("galv-1"), _coil("X").payload, 2, 1)])[1])
            return inserted

    published = _committing(worker, Racing(), monkeypatch)
    _commit_one(worker, "X")
    [copy] = meanwhile
    assert copy.result.duplicates == ["X"] and not copy.result.publish, copy.result
    assert len(published) == 1
    worker.engine.dispose()


def test_a_coil_another_worker_stored_first_is_not_taken_for_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers on a shared subscription each got a copy of Y; the other stored it first. This worker announces
    nothing for Y, so a later copy that comes here must still find Y unannounced (should the other never have)."""

    class StoredElsewhere(MemoryStore):
        def save_assessed(self, coils, model_ids, published=()):
            import dataclasses

            for coil in coils:  # the other worker's decision, a moment earlier
                if coil.coil_id == "Y":
                    self.coils["Y"] = dataclasses.replace(coil, decided_at=coil.decided_at - timedelta(seconds=1))
            return super().save_assessed(coils, model_ids, published)

    worker = _worker(tmp_path)
    published = _committing(worker, StoredElsewhere(), monkeypatch)
    _commit_one(worker, "X", "Y")
    assert len(published) == 1 and "X" in worker._announced and "Y" not in worker._announced
    worker.engine.dispose()


def test_a_copy_in_the_next_batch_leaves_the_first_batchs_announcement_standing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch N+1 was prepared before the committer took batch N, with another copy of N's coil: it votes on it
    again and finds it stored at its write, a duplicate. N announced it, so it stays announced."""
    from services.mqtt.client import Inbound

    worker = _worker(tmp_path)
    published = _committing(worker, MemoryStore(), monkeypatch)
    batches = [worker._prepare([Inbound(TOPICS.sensors("galv-1"), _coil("X").payload, mid, 1)]) for mid in (1, 2)]
    for batch in batches:
        worker._pending.put(batch)
    committer = threading.Thread(target=worker._commit_batches)
    committer.start()
    worker._pending.put(None)
    committer.join(timeout=30)
    assert len(published) == 1 and "X" in worker._announced
    worker.engine.dispose()


def test_a_coil_the_database_refuses_is_rejected_with_the_start_of_its_message(tmp_path: Path) -> None:
    """A value the database refuses for one coil rejects that coil, and the others of its batch are stored; the
    rejection's excerpt is the start of the message, as for every other rejection (it was the coil id)."""
    from sqlalchemy.exc import DataError

    from services.mqtt.client import Inbound

    class RefusesOne(MemoryStore):
        def save_assessed(self, coils, model_ids, published=()):
            if any(c.coil_id == "C-bad" for c in coils):
                raise DataError("INSERT INTO coils", {}, Exception("value out of range"))
            return super().save_assessed(coils, model_ids, published)

    worker = _worker(tmp_path)
    worker.store = RefusesOne()
    worker.workflow = AssessCoils(worker.store, TOPICS)
    worker._serving = _serving(Thinness())
    batch = [Inbound(r.topic, r.payload, mid=i, qos=1) for i, r in enumerate([_coil("C-bad"), _coil("C-good")])]
    result = worker._commit(worker._prepare(batch)[1], [])
    assert [d.coil_id for d in result.decided] == ["C-good"]
    [rejection] = result.rejected
    assert rejection.coil_id == "C-bad" and rejection.reason.startswith("could not be stored: DataError")
    assert rejection.excerpt == _coil("C-bad").payload[:200].decode()
    worker.engine.dispose()


def test_a_batch_prepared_message_by_message_still_decides_a_coil_id_once(serving: ServingEnsemble) -> None:
    """After a batch broke the ensemble the worker prepares its messages one by one and merges them: each copy of
    a coil met no first copy in its own part. Put together, a second copy is a duplicate, another coil under the
    same id is refused, and a stored decision never announced goes out once."""
    store = MemoryStore()
    workflow = AssessCoils(store, TOPICS)
    workflow.process([_coil("S")], serving)  # stored, never announced (a crash before the broker's word)
    raws = [_coil("A"), _coil("B"), _coil("A"), _coil("A", thin=True), _coil("S"), _coil("S")]
    merged = workflow.merge([workflow.prepare([raw], serving) for raw in raws])
    assert [c.coil_id for c in merged.assessed] == ["A", "B"] and len(merged.decisions) == 2
    assert merged.messages["A"] is raws[0]  # the copy that was voted on, should it be refused at the commit
    assert sorted(merged.result.duplicates) == ["A", "S"] and merged.result.republished == ["S"]
    [refused] = merged.result.rejected
    assert (refused.coil_id, refused.field) == ("A", "coil_id") and "other readings earlier in this batch" in (
        refused.reason
    )
    result = workflow.commit(merged)
    assert [d.coil_id for d in result.decided] == ["A", "B"]
    announced = [orjson.loads(o.payload).get("coil_id") for o in result.publish if "/decisions/" in o.topic]
    assert sorted(announced) == ["A", "B", "S"]


def test_a_worker_whose_subscription_the_broker_refused_is_not_ready(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    worker.subscribed.set()
    worker.ready.set()
    assert worker._readiness() is None
    worker.client._refused_topics["cg/events/models"] = "Not authorized"
    assert (
        worker._readiness()
        == "the broker refused subscriptions made again on reconnecting: cg/events/models (Not authorized)"
    )
    worker.engine.dispose()
