"""``coilguard demo`` (what ``make demo`` runs): the whole loop on one machine, in one process.

1. an initial ensemble is trained on simulated history (quick settings: this is a demo of the
   loop, not of the models' best quality; see docs/benchmarks.md for that);
2. an embedded broker, SQLite, the AssessCoils worker and a simulated line come up;
3. simulated operators check every NOK decision and a share of the OK ones;
4. halfway, the line drifts; ModelScore (on a rolling window) flags the models the operators now
   disagree with, and ReTrain retrains and promotes them while the line keeps running. The weekly
   ReTrain schedule is compressed: the demo runs ReTrain as soon as ModelScore flags a model;
5. the rest of the stream is assessed by the new versions; the summary compares NOK-F1 against the
   simulator's truth before the drift, after it, and after the retrain.

Everything lives under ``var/demo/`` and is recreated on each run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from ml.assessors.registry import available, create
from ml.evaluation.metrics import binary_metrics
from ml.sim import DriftConfig, LineConfig, LineSimulator, SimCoil
from services.config import Settings
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.repositories import SqlFeedbackStore, SqlModelRegistry
from services.jobs import make_retrain, run_score
from services.line import publish_coils
from services.mqtt.broker import EmbeddedBroker
from services.mqtt.client import Inbound, MqttClient
from services.operators import SimulatedOperators
from services.progress import fit_progress
from services.runtime import topics
from services.workers.assess import AssessWorker
from workflows.model_score import log as model_score_log
from workflows.retrain import RetrainOutcome
from workflows.training import register

log = logging.getLogger(__name__)

# All four of the coil paper's models, at quick settings (each assessor's ``quick_settings``: YOLOv8n for 8
# epochs, 3 for the CNN and EfficientNet, 5 for the Siamese network; no pretrained YOLO weights), so that the
# demo fits a few minutes on two cores. They are weaker than the benchmark's models (docs/benchmarks.md).
DEMO_KINDS = ("cnn", "yolo", "effnet", "siamese")


PHASES = ("before drift", "after drift", "after retrain")


class DemoFailed(RuntimeError):
    """The demo could not go on (its worker died or never started): said in one line by `coilguard demo`."""


@dataclass
class DemoConfig:
    seed: int = 7
    history: int = 1500  # simulated coils the initial ensemble is trained on
    kinds: tuple[str, ...] = DEMO_KINDS
    scenario: str = "sensor-drift"
    rate: float = 40.0  # coils per second from the simulated line
    # While ReTrain runs, the line slows down: in a plant the weekly job has a GPU node of its own, here
    # it shares two cores and one interpreter with the line, the broker and the worker.
    retrain_rate: float = 5.0
    before: int = 600  # coils before the drift
    after: int = 600  # coils after the retrained versions are in service
    max_drifted: int = 4000  # give up waiting for a retrain to start after this many drifted coils
    # ReTrain warm-starts from the champion, so a couple of epochs on the drifted feedback suffice here
    retrain_epochs: int | None = 2
    retrain_timeout_s: float = 300.0  # stop retraining further models after this long (the running one finishes)
    score_every_s: float = 3.0
    score_window_s: float = 20.0  # rolling ModelScore window, in the demo's compressed time
    share_ok: float = 0.25  # share of OK decisions the operators check
    feedback_before_retrain: int = 400  # the week's worth of post-drift feedback the ReTrain job would find
    workdir: Path = Path("var/demo")


@dataclass
class Record:
    coil: SimCoil
    phase: str
    decision: str | None = None
    versions: dict[str, int] = field(default_factory=dict)


class Demo:
    def __init__(self, settings: Settings, config: DemoConfig, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console()
        workdir = config.workdir.resolve()
        port = _free_port()
        self.settings = settings.model_copy(
            update={
                "database_url": f"sqlite:///{workdir / 'coilguard.db'}",
                "model_dir": workdir / "models",
                "report_dir": workdir / "reports",
                "mqtt_url": f"embedded://127.0.0.1:{port}",
                "mqtt_client_id": None,
                "score_window": timedelta(seconds=config.score_window_s),
            }
        )
        self.records: dict[str, Record] = {}
        self.phase = "before drift"
        self.events: list[str] = []
        self.scores: dict[str, list[tuple[str, float, int]]] = {}
        self.retrains: list[RetrainOutcome] = []
        self._retrain_thread: threading.Thread | None = None
        self._retrain_error: str | None = None  # the pass crashed: the summary says so and the command fails
        self._worker_error: str | None = None
        self._stopping = threading.Event()
        self._feedback_at_drift: int | None = None
        self._operators: SimulatedOperators | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the story

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        workdir = self.config.workdir
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        upgrade(self.settings.database_url)
        engine = make_engine(self.settings.database_url)
        self._train_initial_ensemble(engine)

        url = self.settings.mqtt
        with EmbeddedBroker(port=url.port), self._worker(engine) as worker, _quieter(model_score_log):
            operators = SimulatedOperators(
                SqlFeedbackStore(engine), self._truth, share_ok=self.config.share_ok, seed=self.config.seed
            ).start()
            self._operators = operators
            listener = MqttClient(url, on_message=lambda m: self._on_decision(m, operators)).connect()
            listener.subscribe(topics(self.settings).all_decisions)
            publisher = MqttClient(url).connect()
            try:
                with Live(self._view(worker, operators), console=self.console, refresh_per_second=4) as live:
                    self._stream(publisher, worker, operators, live)
            finally:
                self._stopping.set()
                if self._retrain_thread is not None:  # never leave torch training in a thread at exit
                    self._retrain_thread.join()
                publisher.close()
                listener.close()
                operators.stop()
        summary = self._summary(operators, time.perf_counter() - started)
        self._print_summary(summary)
        return summary

    def _train_initial_ensemble(self, engine: Any) -> None:
        installed = available()
        kinds = list(self.config.kinds)  # installed matrix assessors: `coilguard demo --kinds` checks them
        history = LineSimulator(LineConfig(seed=self.config.seed + 1, id_prefix="HIST")).dataset(self.config.history)
        self.console.print(
            f"[bold]1. Initial ensemble[/] ({', '.join(kinds)}) on {len(history)} simulated coils of history "
            f"({history.n_nok} NOK), quick settings"
        )
        registry = SqlModelRegistry(engine)
        for kind in kinds:
            assessor = create(kind, {**installed[kind].quick_settings, "seed": self.config.seed})
            with fit_progress(f"  train {kind}", assessor.settings.epochs) as on_epoch:
                report = assessor.fit(history, device=self.settings.device, callback=on_epoch)
            register(assessor, registry, self.settings.model_dir, status="active", dataset=history)
            f1 = report.metrics.get("validation", {}).get("f1_nok")
            self.console.print(
                f"  {kind}: {report.duration_s:.0f} s, validation NOK-F1 {f1:.2f}" if f1 is not None else ""
            )

    @contextlib.contextmanager
    def _worker(self, engine: Any) -> Iterator[AssessWorker]:
        worker = AssessWorker(self.settings, engine=engine, client_id="coilguard-demo-assess")

        def serve() -> None:  # a worker that dies says why: the demo stops instead of publishing into nothing
            try:
                worker.run()
            except BaseException as exc:
                self._worker_error = f"{type(exc).__name__}: {exc}"
                log.exception("the demo's AssessCoils worker failed")

        self._worker_thread = threading.Thread(target=serve, name="assess", daemon=True)
        self.console.print("[bold]2. Embedded broker, SQLite, AssessCoils worker, simulated line and operators[/]")
        # the worker connects once the broker (started by the caller) is up
        self._worker_thread.start()
        try:
            deadline = time.monotonic() + 60
            while not worker.ready.wait(0.2):
                self._check_worker()
                if time.monotonic() > deadline:
                    raise DemoFailed("the AssessCoils worker did not start within 60 s")
            yield worker
        finally:
            worker.stop()
            self._worker_thread.join(60)

    def _check_worker(self) -> None:
        if not self._worker_thread.is_alive():
            raise DemoFailed(f"the AssessCoils worker stopped ({self._worker_error or 'without an error'})")

    def _stream(self, publisher: MqttClient, worker: AssessWorker, operators: SimulatedOperators, live: Live) -> None:
        cfg = self.config
        line = LineSimulator(LineConfig(seed=cfg.seed, id_prefix="DEMO"))
        stream = line.stream()
        tps = topics(self.settings)
        next_score = time.monotonic() + cfg.score_every_s
        drifted = after = 0
        tick = time.perf_counter()
        for n in itertools.count():
            self._check_worker()
            if self.phase == "before drift" and n >= cfg.before:
                line.set_drift(DriftConfig(scenario=cfg.scenario, ramp=100))
                self.phase = "after drift"
                self._feedback_at_drift = operators.given
                self._event(f"the line drifts: {cfg.scenario}")
            if self.phase == "after drift":
                drifted += 1
                if self._retrain_done() or (self._retrain_thread is None and drifted > cfg.max_drifted):
                    self.phase = "after retrain"
                    self._event(self._retrain_verdict())
            if self.phase == "after retrain":
                after += 1
                if after > cfg.after:
                    break
            coil = next(stream)
            with self._lock:
                self.records[coil.coil_id] = Record(coil, self.phase)
            publish_coils(publisher, tps, [coil])
            if time.monotonic() >= next_score:
                next_score = time.monotonic() + cfg.score_every_s
                self._score_and_maybe_retrain()
                live.update(self._view(worker, operators))
            tick += 1 / (cfg.retrain_rate if self._retraining() else cfg.rate)
            delay = tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        publisher.flush(30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (self._undecided() or not operators.idle()):
            time.sleep(0.1)
            live.update(self._view(worker, operators))
        live.update(self._view(worker, operators))

    def _score_and_maybe_retrain(self) -> None:
        for scored in run_score(self.settings):
            if scored.row.score is None:
                continue
            history = self.scores.setdefault(scored.row.name, [])
            history.append((self.phase, scored.row.score, scored.row.version))
            if scored.below_threshold and history[-2:-1] and history[-2][1] >= self.settings.score_threshold:
                self._event(
                    f"ModelScore flags {scored.row.name} v{scored.row.version}: "
                    f"{scored.row.score:.0%} over {scored.row.n_coils} coils"
                )
        flagged = any(
            s[-1][0] == "after drift" and s[-1][1] < self.settings.score_threshold for s in self.scores.values()
        )
        # The weekly job finds a week of feedback; the demo waits for that much after the drift, so that
        # the challenger has enough drifted coils to learn from (and the holdout enough to judge it).
        enough = self._feedback_since_drift() >= self.config.feedback_before_retrain
        if flagged and enough and self._retrain_thread is None and self.phase == "after drift":
            self._retrain_thread = threading.Thread(target=self._retrain, name="retrain", daemon=True)
            self._retrain_thread.start()

    def _feedback_since_drift(self) -> int:
        return self._operators.given - self._feedback_at_drift if self._feedback_at_drift is not None else 0

    def _retrain(self) -> None:
        """The weekly job, one model at a time so that each promotion shows as it happens. What is due is
        asked again after each model: ModelScore keeps running beside it, and a model it flags meanwhile
        would be in the real job's list a week later (here: without this, EfficientNet flagged a few
        seconds after the job began stayed v1 and held the recovery back)."""
        self._event("ReTrain starts (the weekly job, run now)")
        deadline = time.monotonic() + self.config.retrain_timeout_s
        try:
            job = make_retrain(
                self.settings,
                fit_overrides={"epochs": self.config.retrain_epochs} if self.config.retrain_epochs else None,
                stop=self._stopping,  # Ctrl-C: the training ends at its next epoch, not after the whole model
            )
            tried: set[str] = set()
            while due := next((d for d in job.due() if d.model.name not in tried), None):
                tried.add(due.model.name)
                if time.monotonic() > deadline or self._stopping.is_set():
                    self._event(f"ReTrain {due.model.name}: not started, the demo's time for retraining is up")
                    continue
                outcome = job.retrain(due)
                self.retrains.append(outcome)
                new = f" → v{outcome.challenger_version}" if outcome.challenger_version else ""
                self._event(f"ReTrain {outcome.model} v{outcome.version}{new}: {outcome.status}")
        except Exception as exc:  # the demo goes on; the summary says what happened, and the command fails
            log.exception("demo retrain failed")
            self._retrain_error = f"{type(exc).__name__}: {exc}"
            self._event(f"ReTrain failed: {exc}")

    def _retraining(self) -> bool:
        return self._retrain_thread is not None and self._retrain_thread.is_alive()

    def _retrain_done(self) -> bool:
        return self._retrain_thread is not None and not self._retrain_thread.is_alive()

    def _retrain_verdict(self) -> str:
        """What the phase after the ReTrain pass runs on: the pass may have promoted nothing (every challenger
        rejected, or no model was due), and the drifted versions then keep serving."""
        if not self._retrain_done():
            return "no retrain: giving up"
        if self._retrain_error is not None:
            return f"ReTrain failed ({self._retrain_error}): the versions from before the drift keep serving"
        promoted = [f"{o.model} v{o.challenger_version}" for o in self.retrains if o.status == "promoted"]
        if promoted:
            return f"retrained versions in service: {', '.join(promoted)}"
        return "ReTrain promoted nothing (see its runs below): the versions from before the drift keep serving"

    # ------------------------------------------------------------------ observations

    def _on_decision(self, message: Inbound, operators: SimulatedOperators) -> None:
        doc = orjson.loads(message.payload)
        with self._lock:
            record = self.records.get(doc["coil_id"])
            if record is not None and record.decision is None:
                record.decision = doc["decision"]
                record.versions = {v["model"]: v["version"] for v in doc["votes"]}
        operators.on_decision(message)

    def _truth(self, coil_id: str) -> int | None:
        record = self.records.get(coil_id)
        return record.coil.true_label if record is not None else None

    def _undecided(self) -> int:
        with self._lock:
            return sum(r.decision is None for r in self.records.values())

    def _event(self, text: str) -> None:
        self.events.append(f"{len(self.records):5d} coils · {text}")
        log.info("demo: %s", text)

    def _view(self, worker: AssessWorker, operators: SimulatedOperators) -> Group:
        table = Table(title=f"coilguard demo · {self.phase}", show_header=False, expand=False)
        table.add_row("coils published / decided", f"{len(self.records)} / {worker.stats.decided}")
        table.add_row("operator feedback rows", str(operators.given))
        if self.phase == "after drift" and self._retrain_thread is None:
            wanted = self.config.feedback_before_retrain
            table.add_row("feedback since the drift", f"{self._feedback_since_drift()} / {wanted}")
        if self._retraining():
            table.add_row("line rate", f"{self.config.retrain_rate:g} coils/s while ReTrain shares the CPU")
        for name, history in sorted(self.scores.items()):
            _, score, version = history[-1]
            table.add_row(f"score {name} v{version}", f"{score:.0%}")
        events = Table(show_header=False, box=None)
        for line in self.events[-6:]:
            events.add_row(line)
        return Group(table, events)

    # ------------------------------------------------------------------ the summary

    def _summary(self, operators: SimulatedOperators, seconds: float) -> dict[str, Any]:
        phases: dict[str, Any] = {}
        for phase in PHASES:
            decided = [r for r in self.records.values() if r.phase == phase and r.decision is not None]
            if not decided:
                continue
            y = np.array([r.coil.true_label for r in decided])
            p = np.array([r.decision == "NOK" for r in decided], dtype=float)
            metrics = binary_metrics(y, p)
            phases[phase] = {
                "coils": len(decided),
                "true_nok": int(y.sum()),
                "nok_f1": metrics["f1_nok"],
                "precision": metrics["precision_nok"],
                "recall": metrics["recall_nok"],
            }
        decided = sum(r.decision is not None for r in self.records.values())
        problems = [f"ReTrain failed: {self._retrain_error}"] if self._retrain_error else []
        if self._retrain_thread is None:
            problems.append("no ReTrain started: ModelScore flagged no model after the drift")
        problems += [
            f"ReTrain of {o.model} v{o.version} failed: {o.reason}" for o in self.retrains if o.status == "failed"
        ]
        problems += [f"no coil was decided {phase}" for phase in PHASES if phase not in phases]
        if decided < len(self.records):
            problems.append(f"{len(self.records) - decided} of {len(self.records)} coils were never decided")
        return {
            "seconds": round(seconds, 1),
            "coils": len(self.records),
            "decided": decided,
            "feedback": operators.given,
            "phases": phases,
            "scores": {name: [(phase, round(s, 3), v) for phase, s, v in h] for name, h in self.scores.items()},
            "retrains": [o.__dict__ | {"metrics": None} for o in self.retrains],
            "events": self.events,
            "promoted": any(o.status == "promoted" for o in self.retrains),
            "problems": problems,  # what `coilguard demo` exits 1 for: the loop did not run as it should
        }

    def _print_summary(self, summary: dict[str, Any]) -> None:
        c = self.console
        c.print(f"\n[bold]Summary[/] ({summary['seconds']:.0f} s)")
        c.print(
            f"{summary['coils']} coils published, {summary['decided']} decided, "
            f"{summary['feedback']} operator feedback rows"
        )
        table = Table(
            "phase", "coils", "true NOK", "NOK-F1", "precision", "recall", title="Ensemble vs the simulator's truth"
        )
        for phase, m in summary["phases"].items():
            table.add_row(
                phase if phase != "after retrain" or summary["promoted"] else "after retrain (none promoted)",
                str(m["coils"]),
                str(m["true_nok"]),
                f"{m['nok_f1']:.2f}",
                f"{m['precision']:.2f}",
                f"{m['recall']:.2f}",
            )
        c.print(table)
        scores = Table(
            "model",
            "score before drift",
            "after drift (lowest)",
            "after retrain",
            title="ModelScore (agreement with operators)",
        )
        for name, history in sorted(summary["scores"].items()):
            by_phase = {
                phase: [s for p, s, _ in history if p == phase]
                for phase in ("before drift", "after drift", "after retrain")
            }
            scores.add_row(
                name,
                _fmt(by_phase["before drift"][-1] if by_phase["before drift"] else None),
                _fmt(min(by_phase["after drift"]) if by_phase["after drift"] else None),
                _fmt(by_phase["after retrain"][-1] if by_phase["after retrain"] else None),
            )
        c.print(scores)
        runs = Table("model", "from", "to", "status", "why", title="ReTrain runs")
        for o in summary["retrains"]:
            runs.add_row(
                o["model"],
                f"v{o['version']}",
                f"v{o['challenger_version']}" if o["challenger_version"] else "",
                o["status"],
                o["reason"],
            )
        c.print(runs)
        c.print("Events:")
        for line in summary["events"]:
            c.print(f"  {line}")
        for problem in summary["problems"]:
            c.print(f"[bold red]problem:[/] {problem}")


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _quieter(logger: logging.Logger) -> Iterator[None]:
    """``logger`` at WARNING for the block. ModelScore logs one line per model every run, and the demo runs
    it every few seconds of its compressed week: some 140 lines that buried the drift, the retrain and the
    promotions. The demo's own table shows every score, and its events say when a model is flagged."""
    level = logger.level
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(level)


def run_demo(settings: Settings, **overrides: Any) -> dict[str, Any]:
    return Demo(settings, DemoConfig(**overrides)).run()


__all__ = ["DEMO_KINDS", "Demo", "DemoConfig", "run_demo"]
