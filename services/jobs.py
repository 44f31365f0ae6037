"""The periodic jobs (ModelScore, ReTrain) wired to PostgreSQL and MQTT: what the CLI, the scheduler,
the CronJob and the demo all call, so that each runs the very same code."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from services.config import Settings
from services.db.engine import engine_for, make_engine
from services.db.repositories import (
    SqlFeedbackStore,
    SqlModelRegistry,
    SqlRetrainRuns,
    SqlScoreStore,
    worker_name,
)
from services.metrics import METRICS
from services.runtime import mqtt_client, topics
from workflows.model_score import ScoredModel, ScoreRule, score_models
from workflows.retrain import ReTrain, RetrainConfig, RetrainOutcome

log = logging.getLogger(__name__)


def score_rule(settings: Settings) -> ScoreRule:
    return ScoreRule(threshold=settings.score_threshold, min_coils=settings.min_scored_coils)


def run_score(settings: Settings, engine: Engine | None = None) -> list[ScoredModel]:
    with engine_for(settings.database_url, engine) as engine:
        store = SqlScoreStore(engine)
        rule, now = score_rule(settings), datetime.now(UTC)
        scored = score_models(store, rule, window=settings.score_window, now=now)
        since = store.below_since([s.row.model_id for s in scored if s.below_threshold], rule)
    METRICS.score.clear()  # a name no longer active keeps no score
    METRICS.below_rule_seconds.clear()
    for s in scored:  # a version promoted since its name's last score has none yet: NaN, not its predecessor's
        METRICS.score.labels(s.row.name).set(s.row.score if s.row.score is not None else math.nan)
        began = since.get(s.row.model_id) if s.below_threshold else None
        METRICS.below_rule_seconds.labels(s.row.name).set((now - began).total_seconds() if began else 0.0)
    return scored


class MqttEventPublisher:
    """Publishes model events; a broker that is away does not undo a promotion (workers also poll)."""

    def __init__(self, settings: Settings, purpose: str = "retrain") -> None:
        self.settings = settings
        self.client_id = f"coilguard-{purpose}-{worker_name().replace(':', '-')}"

    def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        topics = ", ".join(sorted({topic for topic, _ in messages}))
        try:
            with mqtt_client(self.settings, client_id=self.client_id) as client:
                for topic, payload in messages:
                    client.publish(topic, payload, qos=1)
                if not client.flush(10):
                    log.warning("the broker did not confirm the events on %s within 10 s", topics)
                elif refused := client.take_refused():
                    log.warning(
                        "the broker refused the events on %s (%s: its ACL?); workers will notice the new version by "
                        "polling", topics, ", ".join(sorted({reason for _, reason in refused})),
                    )  # fmt: skip
        except ConnectionError as exc:
            log.warning("could not announce on %s (%s); workers will notice the new version by polling", topics, exc)


def prune_model_store(settings: Settings, engine: Engine, keep: int) -> int:
    """After a ReTrain pass, remove from ``MODEL_DIR`` what no version in service needs (``workflows.model_store``);
    the bytes freed. Each promotion adds a version folder and a training set of tens of MB, and a volume that fills
    up fails the next promotion. A failure here is logged and leaves the pass's outcome as it was: the models
    serve the same either way."""
    from workflows.model_store import plan_prune, prune

    try:
        plan = plan_prune(SqlModelRegistry(engine).all(), settings.model_dir, keep=keep)
        for problem in plan.unreadable:
            log.warning("MODEL_DIR: every training set kept, as the manifest of %s cannot be read", problem)
        freed = prune(plan) if plan.paths else 0
    except Exception:
        log.exception("pruning MODEL_DIR after ReTrain failed; nothing served is affected")
        return 0
    if freed:
        log.info("MODEL_DIR pruned after ReTrain: %.1f MB freed (MODEL_KEEP=%d retired per name)", freed / 1e6, keep)
    return freed


def make_retrain(
    settings: Settings,
    engine: Engine | None = None,
    *,
    fit_overrides: dict[str, Any] | None = None,
    publish: bool = True,
    stop: threading.Event | None = None,
) -> ReTrain:
    engine = engine or make_engine(settings.database_url)
    return ReTrain(
        registry=SqlModelRegistry(engine),
        scores=SqlScoreStore(engine),
        feedback=SqlFeedbackStore(engine),
        runs=SqlRetrainRuns(engine),
        model_dir=settings.model_dir,
        worker=worker_name(),
        config=RetrainConfig(
            rule=score_rule(settings),
            margin=settings.retrain_margin,
            recalibrate=settings.retrain_recalibrate,
            read_through=settings.retrain_read_through,
            device=settings.device,
            fit_overrides=fit_overrides or {},
        ),
        publisher=MqttEventPublisher(settings) if publish else None,
        topics=topics(settings),
        stop=stop,
    )


def run_retrain(
    settings: Settings,
    *,
    names: list[str] | None = None,
    force: bool = False,
    stop: threading.Event | None = None,
) -> list[RetrainOutcome]:
    """``stop``: set by a scheduler that is shutting down; the training in progress ends at its next epoch."""
    with engine_for(settings.database_url) as engine:
        outcomes = make_retrain(settings, engine, stop=stop).run(names=names, force=force)
        if settings.model_keep is not None and not (stop is not None and stop.is_set()):
            prune_model_store(settings, engine, settings.model_keep)
    for outcome in outcomes:
        METRICS.retrain_runs.labels(outcome.model, outcome.status).inc()
        if "total_s" in outcome.metrics:
            METRICS.retrain_seconds.labels(outcome.model).observe(outcome.metrics["total_s"])
    return outcomes
