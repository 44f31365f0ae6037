"""The human-in-the-loop cycle on real PostgreSQL + Mosquitto: feedback → ModelScore → ReTrain → reload."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from assess_env import AssessEnv, assess_env, wait_for
from cli_runner import coilguard
from sqlalchemy import select, text

from ml.assessors.registry import create
from ml.dataset import CoilDataset
from ml.sim import LineConfig, LineSimulator, SimCoil
from services.db.engine import make_engine
from services.db.models import Assessment, Coil, ModelPerformance, RetrainRun
from services.db.repositories import SqlRetrainRuns
from services.jobs import make_retrain
from services.line import publish_coils
from services.workers import assess as assess_worker
from workflows.ports import ModelRecord
from workflows.training import load_model


@pytest.fixture
def env(
    request: pytest.FixtureRequest,
    pg_database_factory: Callable[[], str],
    mqtt_url: str,
    topic_prefix: str,
    tmp_path: Path,
) -> Iterator[AssessEnv]:
    with assess_env(pg_database_factory(), mqtt_url, f"{topic_prefix}/{request.node.name}", tmp_path / "models") as env:
        yield env


def _coils_with_noks(n_nok: int, n_ok: int, prefix: str, seed: int = 31) -> list[SimCoil]:
    """A stream of simulated coils with more NOK than the line's few percent, in production order."""
    chosen, nok, ok = [], 0, 0
    for coil in LineSimulator(LineConfig(seed=seed, id_prefix=prefix)).stream():
        if coil.true_label and nok < n_nok:
            nok += 1
            chosen.append(coil)
        elif not coil.true_label and ok < n_ok and (nok * n_ok >= ok * n_nok):
            ok += 1
            chosen.append(coil)
        if nok == n_nok and ok == n_ok:
            return chosen
    raise AssertionError("unreachable")


def _history(n: int, seed: int, blind: bool = False) -> CoilDataset:
    data = LineSimulator(LineConfig(seed=seed, id_prefix=f"H{seed}")).dataset(n)
    if blind:  # a champion that never learnt what a NOK coil looks like
        data.y[:] = 0
    return data


def _register_trained(env: AssessEnv, data: CoilDataset, saved: dict | None = None, **settings: object) -> ModelRecord:
    """Train a CNN on ``data`` and put it in service; ``data`` is kept as its history for ReTrain.
    ``saved`` changes the settings recorded with it (what a retrain of it will use)."""
    cnn = create("cnn", {"batch_size": 32, "seed": 3, **settings})
    cnn.fit(data, device="cpu")
    if saved:
        cnn.settings = cnn.settings.model_copy(update=saved)
    return env.register(cnn, status="active", dataset=data)


def _feedback_sql(env: AssessEnv, coils: list[SimCoil]) -> None:
    """Operators' verdicts, written the way any plant tool can: plain SQL."""
    with env.engine.begin() as conn:
        for coil in coils:
            conn.execute(
                text("INSERT INTO feedback (coil_id, label, operator) VALUES (:c, :l, 'shift-b')"),
                {"c": coil.coil_id, "l": "NOK" if coil.true_label else "OK"},
            )


def _cli(env: AssessEnv, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return coilguard(*args, env=env.env(worker=False), timeout=timeout)


def test_the_loop_closes_score_retrain_promote_reload_without_losing_a_coil(env: AssessEnv) -> None:
    champion = _register_trained(env, _history(150, seed=41, blind=True), epochs=4)
    first = _coils_with_noks(70, 130, "L1")
    line_coils = LineSimulator(LineConfig(seed=55, id_prefix="L2")).stream()
    retraining = threading.Event()
    published: list[SimCoil] = []

    def line() -> None:  # the line keeps producing, at 40 coils/s, while the model is retrained
        while retraining.is_set():
            coil = next(line_coils)
            publish_coils(env.publisher, env.topics, [coil])
            published.append(coil)
            time.sleep(1 / 40)

    with env.worker() as worker:
        publish_coils(env.publisher, env.topics, first)
        assert wait_for(lambda: env.coils() == 200, timeout=60)
        _feedback_sql(env, first)

        scored = _cli(env, "score")
        assert scored.returncode == 0, scored.stderr
        with env.engine.connect() as conn:
            row = conn.execute(select(ModelPerformance)).one()
        assert row.n_coils == 200 and row.score < 0.75 and row.below_threshold, scored.stdout

        retraining.set()
        producer = threading.Thread(target=line)
        producer.start()
        try:
            retrained = _cli(env, "retrain")
        finally:
            retraining.clear()
            producer.join()
        assert retrained.returncode == 0, retrained.stderr[-3000:]
        assert "promoted" in retrained.stdout, retrained.stdout
        assert wait_for(lambda: worker.stats.reloads >= 1, timeout=40)
        tail = LineSimulator(LineConfig(seed=56, id_prefix="L3")).take(20)
        publish_coils(env.publisher, env.topics, tail)
        total = 200 + len(published) + len(tail)
        assert wait_for(lambda: env.coils() == total, timeout=60), (env.coils(), total)

    active = env.registry.active_models()
    assert [(m.name, m.version) for m in active] == [("cnn", 2)]
    assert env.registry.get(champion.id).status == "retired"
    with env.engine.connect() as conn:
        run = conn.execute(select(RetrainRun)).one()
        per_coil = conn.execute(select(Assessment.coil_id, Assessment.model_id).order_by(Assessment.coil_id)).all()
    assert run.status == "promoted" and run.challenger_id == active[0].id and run.device
    events = [(e["event"], e["model"], e["version"]) for e in env.listener.model_events]
    assert events == [("retired", "cnn", 1), ("promoted", "cnn", 2)], env.listener.model_events  # DESIGN §3
    assert run.metrics["holdout"]["challenger"] > run.metrics["holdout"]["champion"]
    challenger = load_model(active[0], env.settings.model_dir)  # validated on the champion's validation coils and
    assert challenger.training_data["validation"]["rule"].startswith("warm start")  # operators' coils new to it
    kept = set(load_model(env.registry.get(champion.id), env.settings.model_dir).training_data["validation_coils"])
    validation, new = set(challenger.training_data["validation_coils"]), {c.coil_id for c in first}
    recalibration = run.metrics["data"]["recalibration"]
    assert recalibration is not None and challenger.training_data["recalibration"] == recalibration
    if recalibration["gains"]:  # the history, from another line, read differently: recalibrated, so kept
        assert kept <= validation <= kept | new and validation & new
    else:  # the blind champion's validation coils hold no NOK; the operators' coils do
        assert validation <= new
    assert len(per_coil) == total == len({c for c, _ in per_coil})  # every coil once, one vote each
    votes = dict(per_coil)
    assert {votes[c.coil_id] for c in first} == {champion.id}
    assert {votes[c.coil_id] for c in tail} == {active[0].id}  # after the reload: the new version
    during = [votes[c.coil_id] for c in published]  # while retraining: the old one, then the new one
    assert during == sorted(during) and len(published) > 50


def test_an_operator_rolls_back_with_models_promote_and_the_worker_follows_at_once(
    env: AssessEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retrained version the operators distrust is taken back by command, not by SQL; the worker reloads on the
    model event (its registry poll is put off here, so only the event can explain the reload) and the next coils
    carry the old version's votes. Retiring every version on purpose is not counted as a refused reload."""
    monkeypatch.setattr(assess_worker, "RELOAD_POLL_S", 3600.0)
    _register_trained(env, _history(150, seed=41), epochs=1)
    _register_trained(env, _history(150, seed=43), epochs=1)  # v2 active, v1 retired
    with env.worker() as worker:
        publish_coils(env.publisher, env.topics, LineSimulator(LineConfig(seed=57, id_prefix="B1")).take(10))
        assert wait_for(lambda: env.coils() == 10, timeout=60)
        rolled = _cli(env, "models", "promote", "cnn", "1")
        assert rolled.returncode == 0 and "promoted cnn v1, retired v2" in rolled.stdout, rolled.stderr
        assert wait_for(lambda: worker.stats.reloads >= 1, timeout=15)
        publish_coils(env.publisher, env.topics, LineSimulator(LineConfig(seed=58, id_prefix="B2")).take(10))
        assert wait_for(lambda: env.coils() == 20, timeout=60)
        retired = _cli(env, "models", "retire", "cnn", "1", "--force")
        assert retired.returncode == 0 and "no version of any model is active now" in retired.stderr, retired.stderr
        assert wait_for(lambda: [e["event"] for e in env.listener.model_events][-1:] == ["retired"], timeout=15)
        publish_coils(env.publisher, env.topics, LineSimulator(LineConfig(seed=59, id_prefix="B3")).take(10))
        assert wait_for(lambda: env.coils() == 30, timeout=60)
        assert (worker.stats.reloads, worker.stats.refused_reloads) == (1, 0)
    votes = env.votes_per_coil()
    assert {tuple(v) for c, v in votes.items() if c.startswith("B1")} == {(("cnn", 2),)}
    assert {tuple(v) for c, v in votes.items() if c[:2] in ("B2", "B3")} == {(("cnn", 1),)}
    events = [(e["event"], e["model"], e["version"]) for e in env.listener.model_events]
    assert events[-3:] == [("retired", "cnn", 2), ("promoted", "cnn", 1), ("retired", "cnn", 1)], events


def test_a_worse_challenger_is_refused_and_the_champion_keeps_serving(env: AssessEnv) -> None:
    champion = _register_trained(env, _history(1500, seed=42), epochs=4)
    coils = _coils_with_noks(40, 80, "R1", seed=32)
    with env.worker():
        publish_coils(env.publisher, env.topics, coils)
        assert wait_for(lambda: env.coils() == 120, timeout=60)
    _feedback_sql(env, coils)
    wrecking = {"epochs": 1, "lr": 0.5, "class_weight_nok": 0.01, "augment": False}
    # the history and these coils come from two lines whose gauges read differently, so ReTrain would also offer
    # the champion reading through the gains (test_recalibration.py); here only the wrecked challenger competes
    settings = env.settings.model_copy(update={"retrain_read_through": False})
    outcome = make_retrain(settings, env.engine, fit_overrides=wrecking, publish=False).run(force=True)[0]
    assert outcome.status == "rejected" and outcome.metrics["candidates"] is None, outcome
    assert [m.id for m in env.registry.active_models()] == [champion.id]
    with env.engine.connect() as conn:
        run = conn.execute(select(RetrainRun)).one()
    assert run.status == "rejected" and run.challenger_id is None and "worse" in run.reason


def test_sigkill_mid_training_leaves_the_champion_serving_and_does_not_block_the_next_run(
    env: AssessEnv, tmp_path: Path
) -> None:
    champion = _register_trained(env, _history(1200, seed=43), epochs=1, saved={"epochs": 40, "patience": 40})
    # the champion's settings (40 epochs) make the retrain long enough to be killed in the middle
    coils = _coils_with_noks(30, 60, "K1", seed=33)
    with env.worker():
        publish_coils(env.publisher, env.topics, coils)
        assert wait_for(lambda: env.coils() == 90, timeout=60)
    _feedback_sql(env, coils)

    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "retrain", "--force"],
        env=env.env(worker=False),
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: _run_statuses(env) == ["running"], timeout=60)
        time.sleep(3.0)  # well into training
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _run_statuses(env) == ["running"]  # nobody could mark it: the process died
    assert [m.id for m in env.registry.active_models()] == [champion.id]

    outcome = make_retrain(env.settings, env.engine, fit_overrides={"epochs": 1}, publish=False).run(force=True)[0]
    assert outcome.status in ("promoted", "rejected"), outcome  # not blocked by the dead run
    statuses = _run_statuses(env)
    assert statuses[0] == "failed" and statuses[1] == outcome.status
    with env.engine.connect() as conn:
        dead = conn.execute(select(RetrainRun).order_by(RetrainRun.id)).first()
    assert "abandoned" in dead.reason


def test_a_finished_run_releases_its_lock_at_once(env: AssessEnv) -> None:
    """The lock lives on a pooled connection: finishing must free it for this process and for any other."""
    model = env.registry.add(name="locked", kind="cnn", version=1, artifact_uri="locked/v1", sha256="x")
    here, elsewhere = SqlRetrainRuns(env.engine), SqlRetrainRuns(make_engine(env.settings.database_url))
    for status in ("rejected", "failed", "promoted"):
        run = here.start(model.id, "test", "here:1")
        assert run is not None, status
        assert elsewhere.start(model.id, "test", "elsewhere:1") is None  # held while running
        here.finish(run, status)
        other = elsewhere.start(model.id, "test", "elsewhere:1")
        assert other is not None, f"the lock outlived a {status} run"
        elsewhere.finish(other, "rejected")
    elsewhere.engine.dispose()


def _run_statuses(env: AssessEnv) -> list[str]:
    with env.engine.connect() as conn:
        return list(conn.execute(select(RetrainRun.status).order_by(RetrainRun.id)).scalars())


def test_feedback_command_refuses_unknown_coils_and_bad_labels(env: AssessEnv) -> None:
    refused = _cli(env, "feedback", "NO-SUCH-COIL", "NOK", "--operator", "anna")
    assert refused.returncode != 0 and "no coil 'NO-SUCH-COIL'" in refused.stderr
    bad = _cli(env, "feedback", "NO-SUCH-COIL", "MAYBE", "--operator", "anna")
    assert bad.returncode == 2 and "MAYBE" in bad.stderr
    with env.engine.begin() as conn:
        conn.execute(
            Coil.__table__.insert().values(coil_id="C-1", line="galv-1", matrix=np.zeros((264, 18), "<f4").tobytes())
        )
    ok = _cli(env, "feedback", "C-1", "NOK", "--operator", "anna", "--comment", "thin edge")
    assert ok.returncode == 0, ok.stderr
    with env.engine.connect() as conn:
        assert conn.execute(text("SELECT label, operator, comment FROM feedback")).one() == ("NOK", "anna", "thin edge")
