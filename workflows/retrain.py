"""ReTrain: replace the models the operators disagree with, and never put a worse one in service.

For every active model whose latest score breaks the rule (below 75 % over more than 10 coils), unless its
last run was rejected on the very labelled coils, settings and code it would train on now (seeded training
would give the same challenger; ``force`` trains anyway):

1. open a ``retrain_runs`` row under a lock, so two schedulers or a scheduler and the CronJob never
   retrain the same model at once (a run left behind by a killed process is marked failed here); if another
   process's run of the model ended since this pass looked, promoting a version or judging a challenger, the
   model is skipped: what the pass decided on has changed;
2. split the operator-labelled coils by time: the most recent part is the holdout, the rest joins the
   champion's training history (the operator's label wins over the history's for the same coil), put first
   in the gauges' current calibration where a gauge has drifted since it was measured (ml/recalibration.py);
3. train a challenger warm-started from the champion, on the GPU when there is one; where gauges moved,
   the champion reading through their gains (each live reading divided by its gauge's gain) is a second
   candidate, taken unless the retrained one does better on the holdout;
4. compare champion and challenger on the holdout; promote only if the challenger is not worse
   (by more than the configured margin). Promotion is atomic: the artifact is written and
   checksummed, one transaction retires the champion and activates the challenger, and only then
   does the ``promoted`` event go out so that the workers reload.

Whatever fails, the champion keeps serving and the run is marked failed with the reason; a process that is
shutting down (``stop`` set) ends its training at the next epoch the same way, and starts no other. An image
assessor is not retrained here (the coil store keeps matrices, not surface images): it is skipped, with
the command that retrains it from labelled images.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

import ml
import workflows
from ml.assessors.base import AssessBatch, Assessor
from ml.assessors.manifest import MANIFEST_FILE, code_version, source_digest
from ml.assessors.registry import available, create
from ml.dataset import INIT_VALIDATION_CURRENT, LEARNED_BY_INIT, CoilDataset
from ml.evaluation.metrics import binary_metrics, cost_accuracy
from ml.recalibration import GaugeGains, estimate_gains, read_through
from ml.training.runtime import DeviceUnavailable, resolve_device, training_platform
from workflows.model_score import ScoreRule, due_for_retraining
from workflows.ports import (
    ChampionChanged,
    FeedbackStore,
    FinishedRun,
    LabelledCoil,
    LatestScore,
    ModelRecord,
    ModelRegistry,
    Publisher,
    RetrainRuns,
    RunOvertaken,
    ScoreStore,
)
from workflows.topics import Topics
from workflows.training import check_folder_name, load_model, register, resolve_artifact, training_history
from workflows.versions import announce

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainConfig:
    rule: ScoreRule = field(default_factory=ScoreRule)
    margin: float = 0.0  # the challenger may be at most this much worse than the champion
    holdout_fraction: float = 0.3  # newest share of the labelled coils kept for the comparison
    min_holdout: int = 20
    feedback_weight: int = 3  # a labelled coil counts this many times against one coil of history
    min_nok_for_f1: int = 5  # fewer NOK coils in the holdout: compare cost-weighted accuracy instead of NOK-F1
    nok_cost: float = 5.0  # a missed NOK coil weighs as much as this many false alarms (the paper's 5:1)
    recalibrate: bool = True  # put the history in the gauges' current calibration (ml/recalibration.py)
    recalibration_coils: int = 100  # the newest labelled OK coils that say what the current calibration is
    recalibration_tolerance: float = 0.02  # a gauge that moved less than this is left as it was
    read_through: bool = True  # after a gauge drift, also offer the champion reading through the gains
    device: str = "auto"
    fit_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. fewer epochs for the demo


class RetrainStopped(Exception):
    """The process is shutting down: the training ends at an epoch boundary, and the champion keeps serving."""


@dataclass
class RetrainOutcome:
    model: str
    version: int
    status: str  # promoted, rejected, failed or skipped
    reason: str
    challenger_version: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class ReTrain:
    def __init__(
        self,
        *,
        registry: ModelRegistry,
        scores: ScoreStore,
        feedback: FeedbackStore,
        runs: RetrainRuns,
        model_dir: Path,
        worker: str,
        config: RetrainConfig | None = None,
        publisher: Publisher | None = None,
        topics: Topics | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.registry = registry
        self.scores = scores
        self.feedback = feedback
        self.runs = runs
        self.model_dir = Path(model_dir)
        self.worker = worker
        self.config = config or RetrainConfig()
        self.publisher = publisher
        self.topics = topics or Topics()
        self.on_progress = on_progress
        self.stop = stop or threading.Event()

    def due(self) -> list[LatestScore]:
        return due_for_retraining(self.scores.latest(), self.config.rule)

    def run(self, names: list[str] | None = None, force: bool = False) -> list[RetrainOutcome]:
        """Retrain every model that is due (or, with ``force``, every active model named in ``names``)."""
        try:
            if settled := self.runs.settle_abandoned():
                log.info("ReTrain: %d run(s) left running by a process that died are closed", settled)
        except Exception as exc:  # bookkeeping: the pass goes on without it
            log.warning("ReTrain: could not close runs left by dead processes: %s", exc)
        if force:
            candidates = [s for s in self.scores.latest() if names is None or s.model.name in names]
            known = {s.model.id for s in candidates}
            candidates += [
                LatestScore(m, 0, None, datetime.now(UTC))
                for m in self.registry.active_models()
                if m.id not in known and (names is None or m.name in names)
            ]
        else:
            candidates = [s for s in self.due() if names is None or s.model.name in names]
        if not candidates:
            log.info("ReTrain: no model is due")
        outcomes = []
        for latest in candidates:
            if self.stop.is_set():
                log.info("ReTrain: shutting down; %d model(s) left for the next pass", len(candidates) - len(outcomes))
                break
            try:
                outcomes.append(self.retrain(latest, forced=force))
            except Exception as exc:  # before its run began (the registry, the lock: the database went away)
                model = latest.model
                log.exception("ReTrain %s: could not be tried; v%d keeps serving", model.name, model.version)
                why = f"not tried: {type(exc).__name__}: {exc}"
                outcomes.append(RetrainOutcome(latest.model.name, latest.model.version, "failed", why))
        return outcomes

    def retrain(self, latest: LatestScore, forced: bool = False) -> RetrainOutcome:
        champion_record = latest.model
        if (skipped := self._image_model(champion_record)) is not None:
            return skipped
        # replaced since the pass began (the start checks again under the run lock; this saves the reads below)
        if champion_record.id not in {m.id for m in self.registry.active_models()}:
            why = f"v{champion_record.version} is no longer the active version"
            log.info("ReTrain %s: %s; skipped", champion_record.name, why)
            return RetrainOutcome(champion_record.name, champion_record.version, "skipped", why)
        last, judged_since = self._last_judged(champion_record, forced)
        if latest.score is None:
            reason = "forced"
        else:
            reason = f"score {latest.score:.1%} over {latest.n_coils} coils (rule: < {self.config.rule.threshold:.0%})"
            reason += " (forced)" if forced else ""
        labelled = self._labelled_coils()
        inputs = self._inputs(labelled)
        if not forced and (why := _rejected_before(last, inputs)) is not None:
            log.info("ReTrain %s: %s; skipped", champion_record.name, why)
            return RetrainOutcome(champion_record.name, champion_record.version, "skipped", why)
        try:
            # The checks above are seconds old (the labelled coils take a while to read): another process's run of
            # this model may have ended since, and training now would spend hours on a retired champion or on
            # inputs just rejected. The start checks again under the run lock.
            run_id = self.runs.start(
                champion_record.id, reason, self.worker, require_active=True, judged_since=judged_since
            )
        except RunOvertaken as exc:
            log.info("ReTrain %s: %s; skipped", champion_record.name, exc)
            return RetrainOutcome(champion_record.name, champion_record.version, "skipped", str(exc))
        if run_id is None:
            log.info("ReTrain: %s is already being retrained elsewhere", champion_record.name)
            return RetrainOutcome(champion_record.name, champion_record.version, "skipped", "already running")
        started = time.perf_counter()
        metrics: dict[str, Any] = {"trigger": {"score": latest.score, "n_coils": latest.n_coils}, "inputs": inputs}
        device: str | None = None
        promoted: ModelRecord | None = None
        record: ModelRecord | None = None  # the challenger, once it is in the registry as a candidate

        def finish(status: str, why: str | None = None, challenger: ModelRecord | None = None) -> None:
            self.runs.finish(
                run_id,
                status,
                reason=f"{reason}; {why}" if why else None,
                challenger_id=challenger.id if challenger is not None else None,
                metrics=metrics,
                device=device,
            )

        try:
            # first, and on the run's row however it ends (once resolved): a CUDA image whose driver is too old
            # trains on the CPU under `auto`, and a run the deadline stops then says why it was slow
            device = str(resolve_device(self.config.device))
            check_folder_name(champion_record.name)  # before the training, not at the registration after it
            champion = load_model(champion_record, self.model_dir)
            if labelled is None:  # the first read failed: this one fails the run with the reason
                labelled = self.feedback.labelled_coils()
            train_part, holdout = split_by_time(
                labelled, self.config.holdout_fraction, self.config.min_holdout, self.config.min_nok_for_f1
            )
            if not holdout:  # checked before training: a challenger nobody can judge is hours thrown away
                raise ValueError("no operator-labelled coils to compare champion and challenger on")
            history, gains = recalibrated(training_history(champion, self.model_dir), train_part, self.config)
            validated = champion.training_data.get("validation_coils")
            moved = gains is not None and bool(gains.moved)
            data = combine(
                history,
                train_part,
                self.config.feedback_weight,
                validated,
                recalibrated=moved,
                withheld=[c.coil_id for c in holdout],
            )
            metrics["data"] = {
                "history": len(history) if history is not None else 0,
                "feedback_train": len(train_part),
                "holdout": len(holdout),
                "training_set": len(data),
                "recalibration": gains.summary() if gains is not None else None,
            }
            self._progress("training", champion_record.name, metrics["data"])
            challenger = create(
                champion.key, {**champion.settings.inherited(), **self.config.fit_overrides}, name=champion.name
            )
            train_started = time.perf_counter()
            report = challenger.fit(data, init=champion, device=self.config.device, callback=self._epoch_done)
            device = report.device
            metrics["train_s"] = round(time.perf_counter() - train_started, 2)
            challenger.training_data["recalibration"] = metrics["data"]["recalibration"]
            challenger, kept = self._choose(
                champion_record, champion, challenger, data, gains if moved else None, holdout
            )
            metrics["candidates"] = kept.pop("candidates", None)

            verdict, comparison = self.compare(champion, challenger, holdout)
            metrics["holdout"] = comparison
            metrics["total_s"] = round(time.perf_counter() - started, 2)
            if not verdict:
                why = (
                    f"challenger {comparison['metric']} {comparison['challenger']:.3f} is worse than champion "
                    f"{comparison['champion']:.3f} (margin {self.config.margin})"
                )
                finish("rejected", why)
                log.info("ReTrain %s: %s", champion_record.name, why)
                return RetrainOutcome(champion_record.name, champion_record.version, "rejected", why, None, metrics)

            # what the promotion rests on goes into the manifest, beside the figures of the challenger's own fit
            challenger.metrics = {
                **challenger.metrics,
                "retrain": {
                    "champion": {"name": champion_record.name, "version": champion_record.version},
                    "holdout": {k: v for k, v in comparison.items() if k != "detail"},
                    "candidates": metrics["candidates"],
                },
            }
            # promotion: artifact first (written, checksummed), then one transaction, then the event
            record = register(
                challenger,
                self.registry,
                self.model_dir,
                status="candidate",
                parent_id=champion_record.id,
                dataset=kept.get("dataset"),
            )
            try:
                self.registry.promote(record.id, replacing=champion_record.id)
            except ChampionChanged as exc:  # somebody promoted or retired a version during the training
                why = f"{exc}; the challenger stays a candidate (v{record.version}), judged against the old version"
                # not the comparison's verdict: a later run on the same inputs (after a rollback to this champion)
                # must not be skipped as one that would be rejected again
                metrics.pop("inputs", None)
                finish("rejected", why, record)
                log.warning("ReTrain %s: %s", champion_record.name, why)
                return RetrainOutcome(champion_record.name, champion_record.version, "rejected", why, None, metrics)
            promoted = record
            metrics["total_s"] = round(time.perf_counter() - started, 2)
            finish("promoted", challenger=record)
            announce(
                self.publisher,
                self.topics.model_events,
                record.name,
                [("retired", champion_record.version), ("promoted", record.version)],
            )
            why = (
                f"{comparison['metric']} on {comparison['n']} recent labelled coils: "
                f"champion {comparison['champion']:.3f}, challenger {comparison['challenger']:.3f}"
            )
            if kept.get("dataset") is None:
                why += " (the champion reading through the gauges' gains)"
            log.info(
                "ReTrain %s: promoted v%d over v%d (%s)", record.name, record.version, champion_record.version, why
            )
            return RetrainOutcome(record.name, champion_record.version, "promoted", why, record.version, metrics)
        except BaseException as exc:  # SIGTERM and Ctrl-C too: the run must not stay "running"
            metrics["total_s"] = round(time.perf_counter() - started, 2)
            why = f"{type(exc).__name__}: {exc}"
            if promoted is None and record is not None:
                promoted = self._promoted_after_all(record)
            if promoted is None:
                log.exception("ReTrain %s failed; v%d keeps serving", champion_record.name, champion_record.version)
                self._record_end(finish, "failed", why, record)  # a challenger registered before it failed: linked
                outcome = RetrainOutcome(champion_record.name, champion_record.version, "failed", why, None, metrics)
            else:  # what failed came after the promotion (recording the run, the event): the new version serves
                why = f"promoted, then {why} (workers find the new version by polling)"
                log.exception("ReTrain %s: v%d %s", promoted.name, promoted.version, why)
                self._record_end(finish, "promoted", why, promoted)
                outcome = RetrainOutcome(
                    champion_record.name, champion_record.version, "promoted", why, promoted.version, metrics
                )
            if not isinstance(exc, Exception):
                raise
            return outcome

    def _inputs(self, labelled: list[LabelledCoil] | None) -> str | None:
        """The digest of what would train the challenger, or None when it cannot be told now (the labelled coils
        unread, the device unusable: `COILGUARD_DEVICE=cuda` with no GPU seen). The run then starts and fails with
        the reason on its row; raised here, it ended the whole pass with no row, every other model untried."""
        if labelled is None:
            return None
        try:
            return training_inputs(labelled, self.config)
        except DeviceUnavailable as exc:
            log.warning("ReTrain: cannot tell what the challenger would train on (%s); its run will say why", exc)
            return None

    def _labelled_coils(self) -> list[LabelledCoil] | None:
        """The operator-labelled coils, or None when they cannot be read now (the run then fails on them)."""
        try:
            return self.feedback.labelled_coils()
        except Exception as exc:
            log.warning("ReTrain: could not read the labelled coils: %s", exc)
            return None

    def _last_judged(self, record: ModelRecord, forced: bool) -> tuple[FinishedRun | None, int | None]:
        """The model's last run that judged a challenger, and its id for the start's check (0: none yet); for a
        forced run, or when the runs cannot be read (retrain, as before these checks existed), no id: the start
        then checks only that the version is still active."""
        if forced:
            return None, None
        try:
            last = self.runs.last_judged(record.id)
        except Exception as exc:
            log.warning("ReTrain %s: could not read its last run: %s", record.name, exc)
            return None, None
        return last, (last.id if last is not None else 0)

    @staticmethod
    def _record_end(finish: Callable[..., None], *args: Any) -> None:
        """Record how a broken-off run ended, if the database lets us: when it is what broke (a failover), the
        error must not escape, or the pass would end here and the models after this one go untried; the run
        row stays ``running`` and the next run of this model marks it abandoned."""
        try:
            finish(*args)
        except Exception as exc:
            log.error("ReTrain: could not record the run's end (%s): %s", args[0], exc)

    def _promoted_after_all(self, challenger: ModelRecord) -> ModelRecord | None:
        """The challenger, if its promotion committed although the run broke off around it (SIGTERM between the
        commit and the next line, or a connection lost while the server committed): the workers serve it from
        their next look at the registry, so the run must say "promoted", not "failed"."""
        try:
            return challenger if self.registry.get(challenger.id).status == "active" else None
        except Exception:  # the database away: nothing more can be known here
            log.warning("ReTrain %s: could not tell whether v%d was promoted", challenger.name, challenger.version)
            return None

    def _image_model(self, record: ModelRecord) -> RetrainOutcome | None:
        """An image model is skipped, with what to do: the coil store keeps each coil's matrix, not the surface
        images the model votes on, so a challenger could only learn from rendered matrices and would abstain
        on the whole holdout. Skipped, not failed: the condition lasts, and a failed pass would have the
        CronJob run the whole pass again."""
        kind = available().get(record.kind)
        if kind is None or kind.consumes == "matrix":
            return None
        manifest = resolve_artifact(self.model_dir, record.artifact_uri) / MANIFEST_FILE
        why = (
            f"{record.kind} assesses surface images and the coil store keeps none; retrain it from labelled "
            f"images: coilguard train --assessor {record.kind} --name {record.name} --data FOLDER --register, "
            f"with --set for the settings in {manifest} that should carry over"
        )
        log.warning("ReTrain %s: %s; v%d keeps serving", record.name, why, record.version)
        return RetrainOutcome(record.name, record.version, "skipped", why)

    def _choose(
        self,
        record: ModelRecord,
        champion: Assessor,
        retrained: Assessor,
        data: CoilDataset,
        gains: GaugeGains | None,
        holdout: list[LabelledCoil],
    ) -> tuple[Assessor, dict[str, Any]]:
        """The challenger to put against the champion, and what to keep with it (``dataset``: the training data
        to store; ``candidates``: the holdout figures of both, for the run's metrics).

        After a gauge drift, the champion reading through the gains (ml/recalibration.py) is taken unless the
        retrained model does better on the holdout: for a pure gauge drift it is the whole fix, without the
        retraining's noise (docs/benchmarks.md, drift recovery), and it is the smaller change. It keeps the
        champion's history, to which the next ReTrain's gains are again relative.

        The choice is made on the holdout that then judges the chosen one against the champion: the better of two
        faces it, which leans towards promoting. Splitting the holdout (20 coils or so) once more would leave too
        few to judge on; the lean is accepted, not corrected (README, ReTrain)."""
        if gains is None or not self.config.read_through:
            return retrained, {"dataset": data}
        adjusted = read_through(champion, gains)
        metric, results = self._holdout_metrics({"retrained": retrained, "read_through": adjusted}, holdout)
        chosen = "read_through" if results["read_through"][metric] >= results["retrained"][metric] else "retrained"
        log.info(
            "ReTrain %s: %s on the holdout, retrained %.3f, champion reading through the gains %.3f: %s",
            record.name, metric, results["retrained"][metric], results["read_through"][metric], chosen,
        )  # fmt: skip
        candidates = {"metric": metric, "chosen": chosen, **{k: r[metric] for k, r in results.items()}}
        if chosen == "read_through":
            return adjusted, {"dataset": None, "candidates": candidates}
        return retrained, {"dataset": data, "candidates": candidates}

    def _holdout_metrics(
        self, models: dict[str, Assessor], holdout: list[LabelledCoil]
    ) -> tuple[str, dict[str, dict[str, Any]]]:
        """The figure the comparison goes by (NOK-F1, or with too few NOK coils accuracy weighted by the cost of a
        miss: plain accuracy would prefer a model that never flags a coil) and every model's metrics on the
        holdout."""
        if not holdout:
            raise ValueError("no labelled coils to compare champion and challenger on")
        X = np.stack([c.matrix for c in holdout])
        y = np.array([c.label for c in holdout])
        results = {role: binary_metrics(y, model.predict(AssessBatch(X))[0]) for role, model in models.items()}
        for figures in results.values():
            figures["cost_accuracy"] = cost_accuracy(figures["confusion"], self.config.nok_cost)
        return ("f1_nok" if y.sum() >= self.config.min_nok_for_f1 else "cost_accuracy"), results

    def compare(self, champion: Assessor, challenger: Assessor, holdout: list[LabelledCoil]) -> tuple[bool, dict]:
        """Is the challenger at least as good as the champion on the newest labelled coils?"""
        metric, results = self._holdout_metrics({"champion": champion, "challenger": challenger}, holdout)
        y_nok = sum(c.label for c in holdout)
        champion_value, challenger_value = results["champion"][metric], results["challenger"][metric]
        comparison = {
            "metric": metric,
            "n": len(holdout),
            "n_nok": int(y_nok),
            "champion": champion_value,
            "challenger": challenger_value,
            "detail": results,
        }
        return challenger_value >= champion_value - self.config.margin, comparison

    def _epoch_done(self, row: dict[str, Any]) -> None:
        if self.stop.is_set():
            raise RetrainStopped(f"stopped after epoch {row.get('epoch', '?')}: the process is shutting down")

    def _progress(self, stage: str, name: str, detail: dict[str, Any]) -> None:
        if self.on_progress is not None:
            self.on_progress({"stage": stage, "model": name, **detail})


def _rejected_before(last: FinishedRun | None, inputs: str | None) -> str | None:
    """Why to skip a model: its last run that judged a challenger rejected it on the very inputs it would train on
    now (a failed run since, which judged nothing, does not count).

    Training is seeded, so the same labelled coils, settings, code and platform train the same challenger and it
    is rejected again: a weekly CronJob with no new feedback, or a Job retried because another model failed, would
    spend hours (GPU hours) each time for nothing. ``--force`` trains anyway."""
    if inputs is None or last is None or last.status != "rejected" or last.metrics.get("inputs") != inputs:
        return None
    return (
        f"its last run (ended {last.finished_at:%Y-%m-%d %H:%M} UTC) was rejected on the same labelled coils, "
        "settings, code and platform, which would train the same challenger; it waits for new feedback "
        "(coilguard retrain --force trains it anyway)"
    )


def split_by_time(
    labelled: list[LabelledCoil], fraction: float, minimum: int, min_nok: int = 0
) -> tuple[list[LabelledCoil], list[LabelledCoil]]:
    """(older part for training, newest part for the comparison); ``labelled`` is oldest first, and so are both parts.

    The holdout is the newest ``fraction``, at least ``minimum`` coils, and never more than half: when a model
    first falls under the rule, few coils are labelled (11 and up), and a holdout that took them all would
    leave the challenger nothing of what the operators said to learn from.

    It also holds up to ``min_nok`` NOK coils, and never more than half of those labelled: where it has fewer, the
    newest NOK coils of the older part take the places of its oldest OK coils, which go to training (the sizes
    stay). On a holdout of OK coils alone a miss costs nothing, and a challenger that never flags a coil beat a
    champion with a false alarm or two; NOK is a few percent of the coils, and a champion failing by false alarms
    has the newest labels mostly OK: the newest 20 coils often held none."""
    n = len(labelled)
    # one of one: a forced run is judged on it; none of none (the caller says there is nothing to judge on)
    n_holdout = min(max(minimum, round(n * fraction)), max(n // 2, 1), n)
    held = set(range(n - n_holdout, n))
    wanted = min(min_nok, sum(c.label for c in labelled) // 2)
    short = wanted - sum(labelled[i].label for i in held)
    older_nok = [i for i in range(n - n_holdout - 1, -1, -1) if labelled[i].label][: max(short, 0)]
    held_ok = sorted(i for i in held if not labelled[i].label)  # oldest first: they give up their places
    swaps = min(len(older_nok), len(held_ok))
    held = (held - set(held_ok[:swaps])) | set(older_nok[:swaps])
    return [c for i, c in enumerate(labelled) if i not in held], [labelled[i] for i in sorted(held)]


def training_inputs(labelled: list[LabelledCoil], config: RetrainConfig) -> str:
    """A digest of what decides a challenger besides its champion: the labelled coils with their labels (a coil's
    matrix never changes), ReTrain's settings, the code (its source, since an image's version number does not
    change with every build) and the platform it trains on (libraries, device, CPU type)."""
    digest = hashlib.sha256(f"{_source()}\n{training_platform(config.device)}\n{config!r}\n".encode())
    for coil in labelled:
        digest.update(f"{coil.coil_id}={coil.label}\n".encode())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def _source() -> str:
    """The code version and a digest of the training code's source (ml/ and workflows/)."""
    return f"{code_version()} {source_digest(*(Path(package.__file__).parent for package in (ml, workflows)))}"


def recalibrated(
    history: CoilDataset | None, labelled: list[LabelledCoil], config: RetrainConfig
) -> tuple[CoilDataset | None, GaugeGains | None]:
    """The champion's history in the gauges' current calibration, read from the newest labelled OK coils
    (ml/recalibration.py), and the gains applied; the history as it was where no gauge moved, too few coils
    say how they read now, or ``config.recalibrate`` is off."""
    if history is None or not config.recalibrate:
        return history, None
    ok = [c.matrix for c in labelled if c.label == 0]
    recent = ok[max(len(ok) - config.recalibration_coils, 0) :]
    gains = estimate_gains(
        np.stack(recent) if recent else np.empty((0, *history.X.shape[1:]), np.float32),
        history.X[history.y == 0],
        tolerance=config.recalibration_tolerance,
    )
    if gains is not None and gains.implausible:
        log.warning(
            "ReTrain: gauges %s read implausibly against the history (dead or wild?); their readings stay as they are",
            [f"s{k:02d}" for k in gains.implausible],
        )
    if gains is None or not gains.moved:
        return history, gains
    log.info(
        "ReTrain: gauges moved since the history was measured (%s); the history is recalibrated",
        ", ".join(f"s{sensor:02d} ×{gain:.3f}" for sensor, gain in gains.moved.items()),
    )
    moved = history.subset(slice(None))
    moved.X = gains.apply(history.X)
    return moved, gains


def combine(
    history: CoilDataset | None,
    labelled: list[LabelledCoil],
    weight: int,
    validated: list[str] | None = None,
    *,
    recalibrated: bool = False,
    withheld: Collection[str] = (),
) -> CoilDataset:
    """History plus the labelled coils (each ``weight`` times); a coil in both takes the operator's label.

    ``withheld``: the holdout's coils, which leave the history too. An earlier ReTrain kept them with the label
    they had then; an operator who has since corrected one made it one of the newest labelled coils, and the
    challenger must neither learn the old word nor be judged on a coil it trained on.

    ``history`` is the champion's own training data, and ``validated`` the coils among it that only validated
    the champion (its manifest lists them): every other history coil is marked ``learned_by_init``, so the
    warm-started challenger never validates on a coil its starting weights learned. Without the history,
    what the champion learned is unknown and nothing is marked. ``recalibrated``: the history was put in the
    gauges' current calibration, so the champion's validation coils speak for the line as it is now and
    validate the challenger beside the new coils (``init_validation_current``)."""
    parts = []
    if labelled:
        ids = np.array([c.coil_id for c in labelled])
        feedback_set = CoilDataset(
            np.stack([c.matrix for c in labelled]),
            np.array([c.label for c in labelled]),
            ids,
            np.array([np.datetime64((c.produced_at or c.feedback_at).replace(tzinfo=None), "ms") for c in labelled]),
            {"source": "operator feedback"},
        )
    else:
        feedback_set = None
    if history is not None:
        learned = np.setdiff1d(history.coil_id, np.asarray(validated or [], dtype=str))
        labelled_ids = [c.coil_id for c in labelled] + list(withheld)
        if labelled_ids:
            keep = ~np.isin(history.coil_id, np.asarray(labelled_ids, dtype=str))
            history = history.subset(np.flatnonzero(keep))
        parts.append(history)
    if feedback_set is not None:
        parts.extend([feedback_set] * max(weight, 1))
    if not parts:
        raise ValueError("nothing to train on: no history and no labelled coils")
    data = CoilDataset.concat(parts) if len(parts) > 1 else parts[0]
    if history is not None:
        data.columns[LEARNED_BY_INIT] = np.isin(data.coil_id, learned).tolist()
        data.meta[INIT_VALIDATION_CURRENT] = recalibrated
    return data
