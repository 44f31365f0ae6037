"""ModelScore and ReTrain selection: the paper's rule at its edges, and the scoring query's semantics."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import sql_retrain, stripe_coils, synthetic_tiles
from score_scenario import assessed_coil
from sqlalchemy import text

from ml.assessors.base import AssessBatch
from ml.assessors.cnn import CnnAssessor
from ml.assessors.manifest import Manifest
from ml.assessors.ssim_ae import SsimAeAssessor
from ml.dataset import INIT_VALIDATION_CURRENT, LEARNED_BY_INIT, CoilDataset
from ml.ensemble import MemberVote
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.repositories import SqlCoilStore, SqlFeedbackStore, SqlModelRegistry, SqlRetrainRuns, SqlScoreStore
from workflows.model_score import ScoreRule, due_for_retraining, score_models
from workflows.ports import LabelledCoil, LatestScore, ModelRecord, UnknownCoil
from workflows.retrain import RetrainConfig, RetrainOutcome, combine, split_by_time
from workflows.training import load_model, register, resolve_artifact, training_history

RULE = ScoreRule(threshold=0.75, min_coils=10)


@pytest.mark.parametrize(
    ("n_coils", "score", "due"),
    [
        (10, 0.0, False),  # exactly 10 coils is not "more than 10"
        (11, 0.74, True),
        (11, 0.75, False),  # exactly 75 % is not "below 75 %"
        (11, 0.7499, True),
        (1000, 0.76, False),
        (0, None, False),
        (50, None, False),
    ],
)
def test_the_papers_rule_at_its_edges(n_coils: int, score: float | None, due: bool) -> None:
    assert RULE.below(n_coils, score) is due


def test_the_rule_follows_the_settings() -> None:
    assert ScoreRule(threshold=0.9, min_coils=3).below(4, 0.85)
    assert not ScoreRule(threshold=0.9, min_coils=3).below(3, 0.0)


# ----------------------------------------------------------------------------- the query, on SQLite


@pytest.fixture
def engine(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    return make_engine(url)


def test_score_uses_the_latest_feedback_ignores_abstentions_and_flags_by_rule(engine) -> None:
    registry = SqlModelRegistry(engine)
    a = registry.add(name="a", kind="cnn", version=1, artifact_uri="a/v1", sha256="x", status="active")
    img = registry.add(name="img", kind="ssim_ae", version=1, artifact_uri="i/v1", sha256="y", status="active")
    registry.add(name="idle", kind="cnn", version=1, artifact_uri="d/v1", sha256="z", status="active")
    store = SqlCoilStore(engine)
    at = datetime.now(UTC)
    ids = {("a", 1): a.id, ("img", 1): img.id}
    coils = []
    for i in range(12):  # model a says NOK on the first 6, OK on the rest; img abstains on all but two
        label = "NOK" if i < 6 else "OK"
        img_vote = MemberVote("img", 1, "NOK", 0.9, 0.9) if i < 2 else MemberVote("img", 1, "ABSTAIN", None, None)
        coils.append(assessed_coil(f"C{i}", [MemberVote("a", 1, label, 0.5, 0.5), img_vote], at))
    store.save_assessed(coils, ids)
    feedback = SqlFeedbackStore(engine)
    for i in range(12):
        feedback.add(f"C{i}", "OK", "anna")  # first word: all OK …
    with engine.begin() as conn:  # … then the latest word on C0–C2, given with plain SQL, says NOK
        conn.execute(
            text(
                "INSERT INTO feedback (coil_id, label, operator) "
                "VALUES ('C0', 'NOK', 'ben'), ('C1', 'NOK', 'ben'), ('C2', 'NOK', 'ben')"
            )
        )
        conn.execute(text("UPDATE feedback SET created_at = '2999-01-01 00:00:00' WHERE operator = 'ben'"))

    scored = {
        s.row.name: s
        for s in score_models(SqlScoreStore(engine), RULE, window=None, now=datetime(3000, 1, 1, tzinfo=UTC))
    }
    a_row = scored["a"].row
    assert (a_row.n_coils, a_row.n_correct) == (12, 9)  # right on C0–C2 (NOK) and C6–C11 (OK)
    assert a_row.precision_nok == pytest.approx(0.5) and a_row.recall_nok == pytest.approx(1.0)
    assert scored["a"].below_threshold is False  # 9/12 = 0.75: not below
    assert (scored["img"].row.n_coils, scored["img"].row.n_correct) == (2, 2)  # abstentions are not votes
    assert scored["idle"].row.n_coils == 0 and scored["idle"].row.score is None
    latest = {s.model.name: s for s in SqlScoreStore(engine).latest()}
    assert latest["a"].n_coils == 12 and latest["a"].score == pytest.approx(0.75)
    assert due_for_retraining(list(latest.values()), RULE) == []
    assert [s.model.name for s in due_for_retraining(list(latest.values()), ScoreRule(0.8, 10))] == ["a"]


def test_a_rolling_window_only_counts_recent_votes(engine) -> None:
    registry = SqlModelRegistry(engine)
    a = registry.add(name="a", kind="cnn", version=1, artifact_uri="a/v1", sha256="x", status="active")
    store = SqlCoilStore(engine)
    now = datetime.now(UTC)
    vote = [MemberVote("a", 1, "OK", 0.1, 0.9)]
    store.save_assessed([assessed_coil("OLD", vote, now - timedelta(days=3))], {("a", 1): a.id})
    store.save_assessed([assessed_coil("NEW", vote, now)], {("a", 1): a.id})
    for coil_id in ("OLD", "NEW"):
        SqlFeedbackStore(engine).add(coil_id, "NOK", "anna")
    rows = SqlScoreStore(engine).agreement(now + timedelta(seconds=1), timedelta(days=1))
    assert rows[0].n_coils == 1


@pytest.mark.parametrize("window", [None, timedelta(days=7)], ids=["since-promotion", "rolling-window"])
def test_a_version_put_back_in_service_is_not_judged_on_the_score_that_had_it_replaced(
    engine, window: timedelta | None
) -> None:
    """cnn v1 is wrong on 12 coils, v2 replaces it, an operator rolls back to v1. Until v1 has votes of its own,
    ReTrain must not see the old 0 % (it would retrain what the operator chose), nor may a rolling window count
    the votes from before the rollback again."""
    registry = SqlModelRegistry(engine)
    v1 = registry.add(name="cnn", kind="cnn", version=1, artifact_uri="c/v1", sha256="x", status="active")
    v2 = registry.add(name="cnn", kind="cnn", version=2, artifact_uri="c/v2", sha256="y", status="candidate")
    at = datetime.now(UTC)
    SqlCoilStore(engine).save_assessed(
        [assessed_coil(f"C{i}", [MemberVote("cnn", 1, "OK", 0.1, 0.9)], at) for i in range(12)], {("cnn", 1): v1.id}
    )
    for i in range(12):
        SqlFeedbackStore(engine).add(f"C{i}", "NOK", "anna")
    scores = SqlScoreStore(engine)
    score_models(scores, RULE, window=window, now=datetime.now(UTC))
    assert [(s.model.version, s.n_coils, s.score) for s in due_for_retraining(scores.latest(), RULE)] == [(1, 12, 0.0)]

    registry.promote(v2.id)
    registry.promote(v1.id)  # the rollback
    assert scores.latest() == [] and due_for_retraining(scores.latest(), RULE) == []
    [row] = [s.row for s in score_models(scores, RULE, window=window, now=datetime.now(UTC))]
    assert (row.version, row.n_coils, row.score) == (1, 0, None)  # counted afresh from the rollback
    assert [(s.model.version, s.n_coils) for s in scores.latest()] == [(1, 0)]


def test_the_score_gauge_follows_the_active_versions(engine, tmp_path: Path) -> None:
    """After a promotion the new version has no score yet: the gauge says NaN, not its predecessor's score (an
    alert on it would go on firing after a successful ReTrain); a name no longer active leaves the gauge."""
    from services.config import load_settings
    from services.jobs import run_score
    from services.metrics import METRICS

    registry = SqlModelRegistry(engine)
    v1 = registry.add(name="cnn", kind="cnn", version=1, artifact_uri="c/v1", sha256="x", status="active")
    gone = registry.add(name="old", kind="cnn", version=1, artifact_uri="o/v1", sha256="z", status="active")
    at = datetime.now(UTC)
    votes = [MemberVote("cnn", 1, "OK", 0.1, 0.9), MemberVote("old", 1, "OK", 0.1, 0.9)]
    SqlCoilStore(engine).save_assessed(
        [assessed_coil(f"C{i}", votes, at) for i in range(4)], {("cnn", 1): v1.id, ("old", 1): gone.id}
    )
    for i in range(4):
        SqlFeedbackStore(engine).add(f"C{i}", "NOK" if i else "OK", "anna")
    settings = load_settings(_env_file=None, database_url=str(engine.url), score_window=None)

    def gauge() -> dict[str, float]:
        return {s.labels["model"]: s.value for m in METRICS.score.collect() for s in m.samples}

    run_score(settings, engine)
    assert gauge() == {"cnn": 0.25, "old": 0.25}
    v2 = registry.add(name="cnn", kind="cnn", version=2, artifact_uri="c/v2", sha256="y", status="candidate")
    registry.promote(v2.id)
    registry.set_status(gone.id, "retired")
    run_score(settings, engine)
    assert list(gauge()) == ["cnn"] and math.isnan(gauge()["cnn"])


def test_how_long_a_model_has_broken_the_rule_is_read_from_its_scores_and_survives_a_restart(engine) -> None:
    """The alert "still below the rule after a week" was a `for: 8d` on the score gauge, which a scheduler restart
    (the gauge absent until its first pass) set back to zero: it would hardly ever fire. The time comes from the
    version's rows in mperformance instead, since the last one that kept the rule."""
    from services.config import load_settings
    from services.db.repositories import models, mperformance
    from services.jobs import run_score
    from services.metrics import METRICS

    registry = SqlModelRegistry(engine)
    v1 = registry.add(name="cnn", kind="cnn", version=1, artifact_uri="c/v1", sha256="x", status="active")
    now, store = datetime.now(UTC), SqlScoreStore(engine)
    with engine.begin() as conn:  # in service for a month
        conn.execute(models.update().values(promoted_at=now - timedelta(days=30)))

    def score(ago: timedelta, below: bool) -> None:
        with engine.begin() as conn:
            conn.execute(
                mperformance.insert().values(
                    model_id=v1.id, computed_at=now - ago, n_coils=20, n_correct=5 if below else 20,
                    score=0.25 if below else 1.0, below_threshold=below,
                )
            )  # fmt: skip

    score(timedelta(days=40), True)  # before this time in service (a rollback's version): not counted
    assert store.below_since([v1.id], ScoreRule(0.75, 10)) == {}
    score(timedelta(days=10), False)
    score(timedelta(days=9), True)
    score(timedelta(days=5), True)
    assert store.below_since([v1.id], ScoreRule(0.75, 10)) == {v1.id: now - timedelta(days=9)}
    score(timedelta(days=1), False)
    assert store.below_since([v1.id], ScoreRule(0.75, 10)) == {}
    score(timedelta(hours=1), True)
    assert store.below_since([v1.id], ScoreRule(0.75, 10)) == {v1.id: now - timedelta(hours=1)}
    # judged by today's rule, not the flag each row was stored with: stricter, the 1.0 rows break it too
    assert store.below_since([v1.id], ScoreRule(1.01, 10)) == {v1.id: now - timedelta(days=10)}

    votes = [MemberVote("cnn", 1, "OK", 0.1, 0.9)]
    SqlCoilStore(engine).save_assessed([assessed_coil(f"C{i}", votes, now) for i in range(12)], {("cnn", 1): v1.id})
    for i in range(12):
        SqlFeedbackStore(engine).add(f"C{i}", "NOK", "anna")
    run_score(load_settings(_env_file=None, database_url=str(engine.url), score_window=None), engine)
    [(name, seconds)] = [(s.labels["model"], s.value) for m in METRICS.below_rule_seconds.collect() for s in m.samples]
    assert name == "cnn" and 3600 <= seconds < 3600 + 60


def test_feedback_for_an_unknown_coil_or_a_bad_label_is_refused(engine) -> None:
    with pytest.raises(UnknownCoil):
        SqlFeedbackStore(engine).add("NOPE", "OK", "anna")
    with pytest.raises(ValueError, match="OK or NOK"):
        SqlFeedbackStore(engine).add("NOPE", "maybe", "anna")


def test_retrain_runs_lock_one_run_per_model_and_clear_dead_ones(engine) -> None:
    """One run per model at a time, across processes. A run whose process was killed (SIGKILL, the OOM killer, a
    power cut) does not block the next one, although its row names a pid that is alive (pid 1, as a restarted
    container's entry point is) on this host."""
    model = SqlModelRegistry(engine).add(name="a", kind="cnn", version=1, artifact_uri="a/v1", sha256="x")
    runs = SqlRetrainRuns(engine)
    first = runs.start(model.id, "test", "here:1")
    assert first is not None
    assert runs.start(model.id, "test", "here:1") is None  # the live run blocks a second one
    runs.finish(first, "rejected")

    elsewhere = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import socket, time
                from services.db.engine import make_engine
                from services.db.repositories import SqlRetrainRuns
                runs = SqlRetrainRuns(make_engine({str(engine.url)!r}))  # holds the lock while it lives
                print(runs.start({model.id}, "test", socket.gethostname() + ":1"), flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert elsewhere.stdout is not None
        dead = int(elsewhere.stdout.readline())
        assert runs.start(model.id, "test", "here:1") is None  # running in another process
        elsewhere.kill()
        elsewhere.wait(10)
    finally:
        elsewhere.kill()
    third = runs.start(model.id, "test", "here:1")
    assert third is not None  # the killed run does not block the next one, whose start marks it failed
    with engine.connect() as conn:
        status = dict(conn.execute(text("SELECT id, status FROM retrain_runs")).all())
    assert status == {first: "rejected", dead: "failed", third: "running"}


def test_a_run_killed_after_its_promotion_is_closed_as_a_promotion_by_the_next_pass(engine) -> None:
    """SIGKILL just after the promotion committed: the run's model is retired, so no later run starts on it and
    closes its row. The next pass closes every dead process's row, as what it did; a live one is left alone."""
    registry = SqlModelRegistry(engine)
    v1 = registry.add(name="a", kind="cnn", version=1, artifact_uri="a/v1", sha256="x", status="active")
    other = registry.add(name="b", kind="cnn", version=1, artifact_uri="b/v1", sha256="y", status="active")
    older = registry.add(name="b", kind="cnn", version=2, artifact_uri="b/v2", sha256="w", parent_id=other.id)
    time.sleep(0.01)  # registered before the runs begin
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import socket, time
                from services.db.engine import make_engine
                from services.db.repositories import SqlModelRegistry, SqlRetrainRuns
                engine = make_engine({str(engine.url)!r})
                runs, registry = SqlRetrainRuns(engine), SqlModelRegistry(engine)
                promoting = runs.start({v1.id}, "score 20%", socket.gethostname() + ":1")
                failing = runs.start({other.id}, "score 30%", socket.gethostname() + ":1")
                v2 = registry.add(name="a", kind="cnn", version=2, artifact_uri="a/v2", sha256="z", parent_id={v1.id})
                registry.promote(v2.id, replacing={v1.id})
                registry.promote({older.id})  # an operator puts an older child of b in service: not the run's
                print(promoting, failing, v2.id, flush=True)
                time.sleep(60)  # killed here, before either run is finished
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    runs = SqlRetrainRuns(engine)
    try:
        assert child.stdout is not None
        promoting, failing, v2 = map(int, child.stdout.readline().split())
        assert runs.settle_abandoned() == 0  # alive: its locks are held
        child.kill()
        child.wait(10)
    finally:
        child.kill()
    assert runs.settle_abandoned() == 2
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(text("SELECT id, status, challenger_id, reason FROM retrain_runs"))}
    assert (rows[promoting].status, rows[promoting].challenger_id) == ("promoted", v2)
    assert "v2 promoted, then its process" in rows[promoting].reason
    assert rows[failing].status == "failed" and "score 30% | abandoned: its process" in rows[failing].reason
    assert runs.settle_abandoned() == 0


def test_an_image_model_due_for_retraining_is_skipped_with_what_to_do(engine, tmp_path: Path) -> None:
    """The coil store keeps matrices, not surface images: ReTrain must say so instead of training a challenger
    on rendered matrices that would then abstain on the whole holdout."""
    champion = SsimAeAssessor({"epochs": 1, "width": 4, "latent_dim": 16, "batch_size": 8}, name="surface")
    champion.fit(synthetic_tiles(), device="cpu")
    registry = SqlModelRegistry(engine)
    record = register(champion, registry, tmp_path, status="active")
    [outcome] = sql_retrain(engine, registry, tmp_path).run(["surface"], force=True)
    assert outcome.status == "skipped" and outcome.challenger_version is None
    assert "coilguard train --assessor ssim_ae --name surface --data FOLDER --register" in outcome.reason
    assert str(tmp_path / record.artifact_uri / "manifest.json") in outcome.reason
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM retrain_runs")).scalar_one() == 0
    assert [(m.name, m.version) for m in registry.active_models()] == [("surface", 1)]  # still serving


def test_a_forced_retrain_without_labelled_coils_fails_before_training(engine, tmp_path: Path) -> None:
    champion = CnnAssessor({"epochs": 1}, name="plain")
    champion.fit(stripe_coils(80, 0.2), device="cpu")
    registry = SqlModelRegistry(engine)
    register(champion, registry, tmp_path, status="active")
    [outcome] = sql_retrain(engine, registry, tmp_path).run(["plain"], force=True)
    assert outcome.status == "failed" and "no operator-labelled coils" in outcome.reason
    assert "train_s" not in outcome.metrics  # no challenger was trained
    assert [(m.name, m.version) for m in registry.active_models()] == [("plain", 1)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case of a GPU asked for that is not there")
def test_a_device_that_is_not_there_fails_each_run_with_its_reason_and_the_pass_goes_on(engine, tmp_path: Path) -> None:
    """COILGUARD_DEVICE=cuda where torch sees no GPU (a node whose driver is older than the image's CUDA): the
    digest of a run's inputs names the device, and raised there the error ended the whole pass before any run was
    recorded, every model untried. Each run is now recorded as failed with the reason, and the champions serve."""
    registry = SqlModelRegistry(engine)
    _serving_with_feedback(engine, registry, tmp_path, ("first", "second"))
    outcomes = sql_retrain(engine, registry, tmp_path, config=RetrainConfig(device="cuda")).run(force=True)
    assert [(o.model, o.status) for o in outcomes] == [("first", "failed"), ("second", "failed")], outcomes
    assert all("no CUDA GPU is available" in o.reason for o in outcomes)
    with engine.connect() as conn:
        runs = conn.execute(text("SELECT status, reason FROM retrain_runs ORDER BY id")).all()
    assert [r.status for r in runs] == ["failed", "failed"] and "no CUDA GPU" in runs[0].reason
    assert sorted((m.name, m.version) for m in registry.active_models()) == [("first", 1), ("second", 1)]


def test_a_shutdown_ends_the_training_at_the_next_epoch_and_starts_no_other(engine, tmp_path: Path) -> None:
    """A scheduler stopped mid-ReTrain (SIGTERM) must not leave the pod's grace period to a SIGKILL: the run
    ends at an epoch boundary, is recorded as failed, the champion keeps serving, the next model waits."""
    registry = SqlModelRegistry(engine)
    _serving_with_feedback(engine, registry, tmp_path, ("first", "second"), epochs=3)
    stop = threading.Event()
    retrain = sql_retrain(engine, registry, tmp_path, stop=stop)
    retrain.on_progress = lambda event: stop.set()  # SIGTERM arrives as the first challenger starts training

    outcomes = retrain.run(force=True)
    assert [(o.model, o.status) for o in outcomes] == [("first", "failed")], outcomes  # "second" never started
    assert "RetrainStopped: stopped after epoch 1" in outcomes[0].reason
    with engine.connect() as conn:
        runs = conn.execute(text("SELECT status, reason FROM retrain_runs")).all()
    assert [r.status for r in runs] == ["failed"] and "shutting down" in runs[0].reason
    assert sorted((m.name, m.version) for m in registry.active_models()) == [("first", 1), ("second", 1)]


def test_a_challenger_judged_against_a_version_replaced_meanwhile_is_not_promoted(engine, tmp_path: Path) -> None:
    """An operator promotes another version while ReTrain trains against the old one. The challenger was never
    compared with the version now serving, so it must not retire it: it stays a candidate. A pass whose list of
    models predates the change skips the version that is no longer active."""
    registry = SqlModelRegistry(engine)
    [old_champion] = _serving_with_feedback(engine, registry, tmp_path, ("line",))
    other = CnnAssessor({"epochs": 1, "seed": 1}, name="line")
    other.fit(stripe_coils(60, 0.2), device="cpu")
    meanwhile = register(other, registry, tmp_path)  # a candidate, v2
    retrain = sql_retrain(engine, registry, tmp_path, config=RetrainConfig(margin=1.0))  # any challenger passes
    retrain.on_progress = lambda event: registry.promote(meanwhile.id)  # the operator, as training starts

    [outcome] = retrain.run(["line"], force=True)
    assert outcome.status == "rejected", outcome
    assert "line v1 was to be replaced, but v2 is active now" in outcome.reason
    assert [(m.name, m.version) for m in registry.active_models()] == [("line", 2)]
    with engine.connect() as conn:
        run = conn.execute(text("SELECT status, challenger_id FROM retrain_runs")).one()
    challenger = registry.get(run.challenger_id)
    assert run.status == "rejected" and (challenger.version, challenger.status) == (3, "candidate")

    stale = retrain.retrain(LatestScore(old_champion, 0, None, datetime.now(UTC)))
    assert stale.status == "skipped" and "v1 is no longer the active version" in stale.reason

    registry.promote(old_champion.id)  # rolled back: v1 is retrained, not skipped as "rejected on these inputs"
    again = retrain.retrain(LatestScore(registry.get(old_champion.id), 0, None, datetime.now(UTC)))
    assert again.status != "skipped", again


def test_a_promotion_whose_announcement_fails_is_recorded_as_a_promotion(engine, tmp_path: Path) -> None:
    """The new version serves once the registry says so; an event that cannot go out afterwards must not have the
    run recorded as failed and the log say the old version keeps serving."""

    class BrokenBroker:
        def publish(self, messages) -> None:
            raise RuntimeError("the broker went away")

    registry = SqlModelRegistry(engine)
    _serving_with_feedback(engine, registry, tmp_path, ("line",))
    retrain = sql_retrain(engine, registry, tmp_path, config=RetrainConfig(margin=1.0), publisher=BrokenBroker())
    [outcome] = retrain.run(["line"], force=True)
    assert (outcome.status, outcome.challenger_version) == ("promoted", 2), outcome
    assert "RuntimeError: the broker went away" in outcome.reason
    assert [(m.name, m.version) for m in registry.active_models()] == [("line", 2)]
    with engine.connect() as conn:
        run = conn.execute(text("SELECT status, reason FROM retrain_runs")).one()
    assert run.status == "promoted" and "the broker went away" in run.reason
    promoted = registry.active_models()[0]
    on_disk = Manifest.read(resolve_artifact(tmp_path, promoted.artifact_uri)).metrics["retrain"]
    assert on_disk == promoted.metrics["retrain"]  # what the promotion rests on, in the manifest and the registry
    assert on_disk["champion"] == {"name": "line", "version": 1} and on_disk["holdout"]["n"] > 0
    assert on_disk["holdout"]["metric"] in ("f1_nok", "cost_accuracy") and "detail" not in on_disk["holdout"]


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
def test_a_promotion_whose_answer_was_lost_is_recorded_as_what_happened(
    engine, tmp_path: Path, committed: bool
) -> None:
    """The connection breaks while the server commits the promotion (SIGTERM right after the commit is the same
    case): the new version serves from the workers' next look at the registry, so the run must say so, not record
    a failure with "v1 keeps serving". Broken before the commit, the run failed, the champion serves, and the run
    names the challenger it had registered (a candidate, there to be promoted by hand)."""
    from sqlalchemy.exc import OperationalError

    class AnswerLost(SqlModelRegistry):
        lose = False

        def promote(self, model_id: int, replacing: int | None = None) -> ModelRecord | None:
            if self.lose and not committed:
                raise OperationalError("BEGIN", {}, Exception("server closed the connection unexpectedly"))
            retired = super().promote(model_id, replacing=replacing)
            if self.lose:
                raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
            return retired

    registry = AnswerLost(engine)
    _serving_with_feedback(engine, registry, tmp_path, ("line",))
    registry.lose = True
    retrain = sql_retrain(engine, registry, tmp_path, config=RetrainConfig(margin=1.0))  # any challenger passes
    [outcome] = retrain.run(["line"], force=True)
    assert "server closed the connection" in outcome.reason
    with engine.connect() as conn:
        run = conn.execute(text("SELECT status, challenger_id FROM retrain_runs")).one()
    challenger = registry.get(run.challenger_id)
    assert challenger is not None and challenger.version == 2
    if committed:
        assert (outcome.status, outcome.challenger_version, run.status) == ("promoted", 2, "promoted"), outcome
        assert [(m.name, m.version) for m in registry.active_models()] == [("line", 2)]
    else:
        assert (outcome.status, run.status, challenger.status) == ("failed", "failed", "candidate"), outcome
        assert [(m.name, m.version) for m in registry.active_models()] == [("line", 1)]


def test_a_coil_the_operators_corrected_is_trained_with_their_word_and_never_both_trained_and_judged_on(
    engine, tmp_path: Path
) -> None:
    """The champion's kept history holds the labelled coils with the opposite label (an earlier ReTrain kept
    them before the operators corrected them). The challenger learns the training part with the operators'
    label only, and the holdout's coils not at all."""
    registry = SqlModelRegistry(engine)
    labelled = stripe_coils(30, 0.3, seed=5)
    before = labelled.subset(slice(None))
    before.y = 1 - before.y
    _serving_with_feedback(
        engine, registry, tmp_path, ("line",), kept=CoilDataset.concat([stripe_coils(60, 0.2), before])
    )
    retrain = sql_retrain(engine, registry, tmp_path, config=RetrainConfig(margin=1.0, recalibrate=False))
    [outcome] = retrain.run(["line"], force=True)
    assert (outcome.status, outcome.challenger_version) == ("promoted", 2), outcome
    assert outcome.metrics["data"]["feedback_train"] == outcome.metrics["data"]["holdout"] == 15
    [challenger] = registry.active_models()
    learned = training_history(load_model(challenger, tmp_path), tmp_path)
    operators = dict(zip(labelled.coil_id.tolist(), labelled.y.tolist(), strict=True))
    seen = [(c, y) for c, y in zip(learned.coil_id.tolist(), learned.y.tolist(), strict=True) if c in operators]
    assert len(seen) == 15 * 3 and all(operators[c] == y for c, y in seen), seen
    assert len(learned) == 60 + 15 * 3


def test_a_champion_whose_kept_history_is_missing_is_not_retrained_without_it(engine, tmp_path: Path) -> None:
    """A history file gone from MODEL_DIR fails the run, saying what to restore: a challenger trained on the
    operators' coils alone would forget the history and, once promoted, lose it for every later ReTrain. Recording
    that failure may itself fail (the database is what broke): the pass still goes on to the next model."""
    from sqlalchemy.exc import OperationalError

    class FailoverRuns(SqlRetrainRuns):
        def finish(self, run_id: int, status: str, **kwargs) -> None:
            if status == "failed":
                raise OperationalError("UPDATE retrain_runs", {}, Exception("server closed the connection"))
            super().finish(run_id, status, **kwargs)

    registry = SqlModelRegistry(engine)
    lost, _ = _serving_with_feedback(engine, registry, tmp_path, ("lost", "whole"), kept=stripe_coils(60, 0.2))
    (tmp_path / load_model(lost, tmp_path).training_data["path"]).unlink()  # both kept the same file
    retrain = sql_retrain(engine, registry, tmp_path, config=RetrainConfig(margin=1.0, recalibrate=False))
    [outcome] = retrain.run(["lost"], force=True)
    assert outcome.status == "failed" and "is missing: restore it" in outcome.reason, outcome
    assert [(m.name, m.version) for m in registry.active_models() if m.name == "lost"] == [("lost", 1)]
    retrain.runs = FailoverRuns(engine)
    first, second = retrain.run(["lost", "whole"], force=True)
    assert [(o.model, o.status) for o in (first, second)] == [("lost", "failed"), ("whole", "failed")]

    class GoneBeforeTheRun(SqlRetrainRuns):  # the connection lost as the first model's run was to be opened
        def start(self, model_id: int, reason: str, worker: str, **kwargs) -> int | None:
            if model_id == lost.id:
                raise OperationalError("INSERT INTO retrain_runs", {}, Exception("server closed the connection"))
            return super().start(model_id, reason, worker, **kwargs)

    retrain.runs = GoneBeforeTheRun(engine)
    first, second = retrain.run(["lost", "whole"], force=True)  # was: the pass raised, the second never tried
    assert (first.status, first.reason.split(":")[0]) == ("failed", "not tried") and "server closed" in first.reason
    assert second.model == "whole"  # tried (and skipped: its run of the pass before is still open, unrecorded)


def test_a_model_rejected_on_the_same_inputs_is_not_retrained_until_new_feedback(
    engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeded training on the same labelled coils, settings, code and platform trains the same challenger: a
    second pass with nothing new (next week's CronJob, or the Job retried after another model failed) skips the
    model; --force, another platform (a GPU node, a new torch) or one more operator word trains it again."""
    registry = SqlModelRegistry(engine)
    _serving_with_feedback(engine, registry, tmp_path, ("line",))
    score_models(SqlScoreStore(engine), RULE)  # 70 % agreement over 30 coils: due
    retrain = sql_retrain(engine, registry, tmp_path, config=RetrainConfig(margin=-1.0))  # nothing passes
    assert [(o.status, o.metrics["inputs"] is not None) for o in retrain.run()] == [("rejected", True)]
    [again] = retrain.run()
    assert again.status == "skipped" and "rejected on the same labelled coils" in again.reason, again
    with engine.begin() as conn:  # a run that failed meanwhile (its GPU was away) judged nothing: still skipped
        conn.execute(
            text(
                "INSERT INTO retrain_runs (model_id, started_at, finished_at, status, reason) "
                "VALUES (:m, :t, :t, 'failed', 'forced; DeviceUnavailable: no CUDA GPU')"
            ),
            {"m": registry.active_models()[0].id, "t": datetime.now(UTC)},
        )
    assert retrain.run()[0].status == "skipped"
    assert [o.status for o in retrain.run(force=True)] == ["rejected"]
    monkeypatch.setattr("workflows.retrain.training_platform", lambda device: "torch 9; cuda 13 H100")
    assert [o.status for o in retrain.run()] == ["rejected"]
    assert retrain.run()[0].status == "skipped"
    SqlFeedbackStore(engine).add(stripe_coils(30, 0.3, seed=5).coil_id[0], "NOK", "ben")  # a new word
    assert [o.status for o in retrain.run()] == ["rejected"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM retrain_runs")).scalar_one() == 5


def test_a_run_that_another_process_finishes_while_this_pass_decides_is_not_repeated(engine, tmp_path: Path) -> None:
    """Two schedulers (or a scheduler and the CronJob) at 03:00: the other one's run of this model opens and ends,
    rejecting a challenger, between this pass's checks and its own start. Its checks saw neither; the start sees
    the newer verdict under the lock and leaves it standing, instead of training the same challenger again."""
    registry = SqlModelRegistry(engine)
    _serving_with_feedback(engine, registry, tmp_path, ("line",))
    score_models(SqlScoreStore(engine), RULE)  # due
    config = RetrainConfig(margin=-1.0)  # nothing passes: the other process rejects its challenger
    other = sql_retrain(engine, registry, tmp_path, config=config)
    finished_first: list[RetrainOutcome] = []

    class Overtaken(SqlRetrainRuns):
        def start(self, model_id: int, reason: str, worker: str, **kwargs) -> int | None:
            finished_first.extend(other.run())  # in the moment between the checks and the start
            return super().start(model_id, reason, worker, **kwargs)

    retrain = sql_retrain(engine, registry, tmp_path, config=config)
    retrain.runs = Overtaken(engine)
    [outcome] = retrain.run()
    assert [o.status for o in finished_first] == ["rejected"]
    assert outcome.status == "skipped" and "ended rejected since this pass looked" in outcome.reason, outcome
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM retrain_runs")).scalars().all() == ["rejected"]


@pytest.mark.parametrize(
    ("ended", "forced", "trained"),
    [
        ("rejected", False, False),  # its verdict stands
        ("promoted", False, False),  # the champion this pass looked at is retired
        ("failed", False, True),  # judged nothing: this pass's decision holds
        ("rejected", True, True),  # --force trains anyway, as long as the version still serves
    ],
)
def test_a_run_already_going_when_this_pass_looked_that_ends_before_it_starts(
    engine, tmp_path: Path, ended: str, forced: bool, trained: bool
) -> None:
    """The more likely form of the race: the CronJob's run (hours long) is under way when the scheduler's pass looks
    (so its checks see no verdict yet), and it ends while the pass reads the labelled coils."""
    registry = SqlModelRegistry(engine)
    [champion] = _serving_with_feedback(engine, registry, tmp_path, ("line",))
    score_models(SqlScoreStore(engine), RULE)  # due
    there = SqlRetrainRuns(make_engine(str(engine.url)))
    going = there.start(champion.id, "score 70%", "there:1")
    assert going is not None

    class EndsMeanwhile(SqlRetrainRuns):
        def start(self, model_id: int, reason: str, worker: str, **kwargs) -> int | None:
            challenger_id = None
            if ended == "promoted":  # what its promotion does, in the registry
                challenger_id = registry.add(
                    name="line", kind="cnn", version=2, artifact_uri="line/v2", sha256="x", status="candidate"
                ).id
                registry.promote(challenger_id, replacing=champion.id)
            there.finish(going, ended, challenger_id=challenger_id, metrics={"inputs": "theirs"})
            return super().start(model_id, reason, worker, **kwargs)

    retrain = sql_retrain(engine, registry, tmp_path, config=RetrainConfig(margin=-1.0))
    retrain.runs = EndsMeanwhile(engine)
    [outcome] = retrain.run(["line"], force=forced)
    assert (outcome.status != "skipped") == trained, outcome
    if not trained:
        assert "since this pass looked" in outcome.reason, outcome
        assert ("no longer the active version" in outcome.reason) == (ended == "promoted"), outcome
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM retrain_runs")).scalar_one() == 1 + trained


def _serving_with_feedback(
    engine,
    registry: SqlModelRegistry,
    model_dir: Path,
    names: tuple[str, ...],
    epochs: int = 1,
    kept: CoilDataset | None = None,
) -> list[ModelRecord]:
    """CNNs named ``names`` in service (v1 each), and 30 assessed coils the operators labelled; ``kept``: the
    champions' training data, kept with them as their history."""
    records = []
    for name in names:
        champion = CnnAssessor({"epochs": epochs, "seed": 0}, name=name)
        champion.fit(kept or stripe_coils(60, 0.2), device="cpu")
        records.append(register(champion, registry, model_dir, status="active", dataset=kept))
    labelled = stripe_coils(30, 0.3, seed=5)
    SqlCoilStore(engine).save_assessed(
        [assessed_coil(str(c), [MemberVote(n, 1, "OK", 0.5, 0.5) for n in names]) for c in labelled.coil_id],
        {(r.name, 1): r.id for r in records},
    )
    feedback = SqlFeedbackStore(engine)
    for coil_id, y in zip(labelled.coil_id, labelled.y, strict=True):
        feedback.add(str(coil_id), "NOK" if y else "OK", "anna")
    return records


# ----------------------------------------------------------------------------- the training data


def _labelled(n: int, start: int = 0) -> list[LabelledCoil]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        LabelledCoil(f"F{i}", np.full((264, 18), i, np.float32), i % 2, t0, t0 + timedelta(minutes=i))
        for i in range(start, start + n)
    ]


def _history(coil_ids: list[str], labels: list[int]) -> CoilDataset:
    """A champion's kept training set of blank coils (what combine does with it depends on ids and labels only)."""
    n = len(coil_ids)
    return CoilDataset(
        np.zeros((n, 264, 18), np.float32),
        np.array(labels),
        np.array(coil_ids),
        np.array(["2026-01-01"] * n, dtype="datetime64[ms]"),
    )


class _Fixed:
    """A model that flags the coils whose first value is 1: what it votes is all the comparison reads."""

    def predict(self, batch: AssessBatch) -> tuple[np.ndarray]:
        return (batch.matrices[:, 0, 0].astype(float),)


def test_with_few_nok_coils_a_challenger_that_never_flags_a_coil_does_not_win_on_accuracy(
    engine, tmp_path: Path
) -> None:
    """100 coils with 4 NOK: the champion finds all four with five false alarms (accuracy 0.95), the challenger
    calls everything OK (0.96). The comparison weighs a miss as five false alarms, as the training does."""
    holdout = []
    now = datetime.now(UTC)
    for i in range(100):
        matrix = np.zeros((264, 18), np.float32)
        matrix[0, 0] = 1.0 if i < 9 else 0.0  # the champion's flags: the 4 NOK and 5 OK coils
        holdout.append(LabelledCoil(f"C{i}", matrix, int(i < 4), None, now))

    class Never:
        def predict(self, batch: AssessBatch) -> tuple[np.ndarray]:
            return (np.zeros(len(batch.matrices)),)

    retrain = sql_retrain(engine, SqlModelRegistry(engine), tmp_path)
    passed, comparison = retrain.compare(_Fixed(), Never(), holdout)  # type: ignore[arg-type]
    assert comparison["metric"] == "cost_accuracy" and not passed, comparison
    assert comparison["detail"]["challenger"]["accuracy"] > comparison["detail"]["champion"]["accuracy"]
    assert comparison["champion"] == pytest.approx(1 - 5 / 116) and comparison["challenger"] == pytest.approx(
        1 - 20 / 116
    )
    passed, _ = retrain.compare(Never(), _Fixed(), holdout)  # type: ignore[arg-type]
    assert passed


def test_holdout_is_the_newest_labelled_coils() -> None:
    train, holdout = split_by_time(_labelled(100), fraction=0.3, minimum=20)
    assert len(holdout) == 30 and holdout[0].coil_id == "F70" and train[-1].coil_id == "F69"
    train, holdout = split_by_time(_labelled(50), fraction=0.3, minimum=20)
    assert len(holdout) == 20 and len(train) == 30
    # when a model first falls under the rule, the operators' coils are few: at most half goes to the holdout
    assert [len(part) for part in split_by_time(_labelled(30), fraction=0.3, minimum=20)] == [15, 15]
    assert [len(part) for part in split_by_time(_labelled(11), fraction=0.3, minimum=20)] == [6, 5]
    assert [len(part) for part in split_by_time(_labelled(3), fraction=0.3, minimum=20)] == [2, 1]
    assert [len(part) for part in split_by_time(_labelled(1), fraction=0.3, minimum=20)] == [0, 1]
    assert split_by_time([], fraction=0.3, minimum=20, min_nok=5) == ([], [])


def test_the_holdout_holds_nok_coils_where_the_labels_allow(engine, tmp_path: Path) -> None:
    """The newest 20 labelled coils were the holdout whatever they held: with the NOK coils all older (a champion
    failing by false alarms, whose newest labels are the operators' OKs), a miss cost nothing there, and a
    challenger that never flags a coil beat a champion with two false alarms and was promoted."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    labelled = []
    for i in range(40):
        matrix = np.zeros((264, 18), np.float32)
        matrix[0, 0] = 1.0 if i < 6 or i in (30, 31) else 0.0  # the champion flags the 6 NOK and two OK coils
        labelled.append(LabelledCoil(f"F{i}", matrix, int(i < 6), t0, t0 + timedelta(minutes=i)))
    train, holdout = split_by_time(labelled, fraction=0.3, minimum=20)
    assert sum(c.label for c in holdout) == 0  # as before: nothing to miss
    train, holdout = split_by_time(labelled, fraction=0.3, minimum=20, min_nok=5)
    assert [c.coil_id for c in holdout if c.label] == ["F3", "F4", "F5"]  # the newest three: half of the six
    assert [c.coil_id for c in train if c.label] == ["F0", "F1", "F2"] and len(train) == len(holdout) == 20
    assert {"F20", "F21", "F22"} <= {c.coil_id for c in train}  # the holdout's oldest OK coils gave up their places
    assert [c.coil_id for c in holdout] == sorted((c.coil_id for c in holdout), key=lambda i: int(i[1:]))
    few = labelled[:2] + labelled[29:]  # 13 coils, 2 NOK (F0, F1), the newest six held out
    train, holdout = split_by_time(few, fraction=0.3, minimum=20, min_nok=5)
    assert len(holdout) == 6 and [c.coil_id for c in holdout if c.label] == ["F1"] and train[0].coil_id == "F0"
    lone = labelled[5:6] + labelled[10:]  # one NOK: it stays with the training
    assert not any(c.label for c in split_by_time(lone, fraction=0.3, minimum=20, min_nok=5)[1])

    class Never:
        def predict(self, batch: AssessBatch) -> tuple[np.ndarray]:
            return (np.zeros(len(batch.matrices)),)

    retrain = sql_retrain(engine, SqlModelRegistry(engine), tmp_path)
    passed, _ = retrain.compare(_Fixed(), Never(), holdout)  # type: ignore[arg-type]
    assert not passed
    assert split_by_time(_labelled(11), fraction=0.3, minimum=20, min_nok=5)[1][-1].coil_id == "F10"  # order kept


def test_combine_lets_the_operator_label_win_and_weights_feedback() -> None:
    history = _history(["H0", "F1", "H2"], [0, 0, 0])
    data = combine(history, _labelled(2), weight=3)
    assert len(data) == 2 + 2 * 3  # F1 leaves the history: the operator said NOK
    assert sorted(set(data.coil_id)) == ["F0", "F1", "H0", "H2"]
    assert data.y[data.coil_id == "F1"].tolist() == [1, 1, 1]


def test_combine_leaves_the_holdouts_coils_out_of_the_history() -> None:
    history = _history(["H0", "F7", "H2"], [0, 1, 0])
    data = combine(history, _labelled(2), weight=1, withheld=["F7"])
    assert sorted(data.coil_id.tolist()) == ["F0", "F1", "H0", "H2"]


def test_combine_marks_the_coils_the_champion_learned() -> None:
    """Every history coil but the champion's validation coils; an operator's coil only if the champion had it."""
    history = _history(["H0", "F1", "H2", "H3"], [0, 0, 0, 1])
    history.columns[LEARNED_BY_INIT] = [False] * 4  # left by the champion's own warm start: not this one's
    data = combine(history, _labelled(2), weight=2, validated=["H2"])
    marked = dict(zip(data.coil_id, data.column(LEARNED_BY_INIT), strict=True))
    assert marked == {"H0": True, "H3": True, "H2": False, "F0": False, "F1": True}
    assert LEARNED_BY_INIT not in combine(None, _labelled(2), weight=2).columns  # unknown: not claimed
    # the champion's validation coils speak for the line now only where the history was recalibrated
    assert data.meta[INIT_VALIDATION_CURRENT] is False
    recalibrated = combine(history, _labelled(2), weight=2, validated=["H2"], recalibrated=True)
    assert recalibrated.meta[INIT_VALIDATION_CURRENT] is True


def test_incremental_tallies_equal_a_full_recount_through_corrections_promotion_and_rollback(engine) -> None:
    from score_scenario import run_history

    history = run_history(engine)
    with engine.connect() as conn:
        unscored = conn.execute(text("SELECT count(*) FROM feedback WHERE score_pass IS NULL")).scalar()
        passes = conn.execute(text("SELECT count(*), sum(n_feedback) FROM score_passes")).one()
        rows = conn.execute(text("SELECT count(*) FROM feedback")).scalar()
    assert unscored == 0 and passes[1] == rows  # every row counted by exactly one pass
    assert passes[0] < len(history.coil_ids)  # empty passes leave no row


def test_an_edit_of_feedback_not_yet_counted_leaves_no_reset(engine) -> None:
    from score_scenario import History

    history = History(engine, seed=4)
    history.assess(10, {"a": 1, "img": 1})
    history.give_feedback(5)
    with engine.begin() as conn:  # corrected before any pass counted it: the pass will count the new label
        conn.execute(text("UPDATE feedback SET label = 'NOK'"))
        conn.execute(text("DELETE FROM feedback WHERE id = 1"))
        assert conn.execute(text("SELECT count(*) FROM score_resets")).scalar_one() == 0
    history.check()
    history.give_feedback(5)
    assert history.store.count_new_feedback() == 5  # no recount was needed


def test_votes_changed_by_hand_are_caught_up_by_a_recount(engine) -> None:
    """What no trigger watches (votes edited in ``assessments``) needs ``coilguard score --recount``."""
    from click.testing import CliRunner
    from score_scenario import History, counts

    from services.cli import cli

    history = History(engine, seed=3)
    history.assess(30, {"a": 1, "img": 1})
    history.give_feedback(40)
    history.check()
    with engine.begin() as conn:  # somebody rewrites votes behind ModelScore's back
        conn.execute(text("UPDATE assessments SET label = 'NOK' WHERE label = 'OK'"))
    now = datetime.now(UTC) + timedelta(days=1)
    assert counts(history.store.agreement(now, None)) != counts(history.store.recount(now))
    env = {"COILGUARD_DATABASE_URL": str(engine.url), "COILGUARD_MQTT_URL": "embedded"}
    result = CliRunner().invoke(cli, ["score", "--recount"], env=env)
    assert result.exit_code == 0, result.output
    assert "a v1:" in result.output
    history.check()  # tallies and recount agree again


def test_score_every_goes_on_after_a_database_error(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """`coilguard score --every`: one failed run (the database restarting) is logged; the next tick runs again."""
    from types import SimpleNamespace

    from click.testing import CliRunner
    from sqlalchemy.exc import OperationalError

    import services.cli.loop
    import services.jobs
    from services.cli import cli

    outcomes: list[BaseException | None] = [
        OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly")),
        None,
        KeyboardInterrupt(),  # Ctrl-C still ends the loop
    ]
    calls: list[int] = []

    def run_score(settings: object) -> list:
        calls.append(1)
        if (outcome := outcomes[len(calls) - 1]) is not None:
            raise outcome
        return []

    monkeypatch.setattr(services.jobs, "run_score", run_score)
    monkeypatch.setattr(services.cli.loop, "time", SimpleNamespace(sleep=lambda _: None))
    env = {"COILGUARD_DATABASE_URL": str(engine.url), "COILGUARD_MQTT_URL": "embedded"}
    result = CliRunner().invoke(cli, ["score", "--every", "1m"], env=env)
    assert len(calls) == 3, result.output
    assert "ModelScore failed; trying again in 60 s" in result.output
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)  # click's "Aborted!"
