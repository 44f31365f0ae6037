"""``coilguard scheduler``: ModelScore every few minutes, ReTrain weekly, drift reports daily, and every few
minutes the decisions stored but never announced (``services.announce``).

Each job runs at most once at a time in this process and missed runs are coalesced; two schedulers,
or a scheduler and the Kubernetes CronJob, are kept from retraining the same model at once by the
database lock in ``retrain_runs``, not by this process.

Stopping (SIGTERM, Ctrl-C, or ``coilguard up`` ending) sets the scheduler's ``stopping`` event: a
ReTrain in progress ends at its next epoch, records its run as failed ("stopped"), and the process
exits once it has; the champion keeps serving and the next pass starts over. Compose's
``stop_grace_period`` covers one epoch (on Kubernetes ReTrain is the CronJob's, not the scheduler's).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from services.config import OFF, Settings
from services.cron import crontab_trigger
from services.job_health import JobWatch
from services.signals import StopSignals

if TYPE_CHECKING:
    from services.heartbeat import Heartbeat

log = logging.getLogger(__name__)

Job = Callable[[Settings], object]

DRIFT_CATCH_UP = "drift-catch-up"
CATCH_UP_TRIES = 2  # catch-ups dying with the process within the horizon, after which none is tried
CATCH_UP_HORIZON = timedelta(days=7)  # missed drift reports older than this are not written afterwards
_MARK_LOCK = threading.Lock()  # the catch-up and a stop's release both rewrite the mark
SCHEMA_POLL_S = 5.0  # how often a scheduler started before its database is ready looks again


class Scheduler(BlockingScheduler):
    """APScheduler's blocking scheduler with a ``stopping`` event that long jobs watch, and hooks that run once
    it is set, before the wait for the jobs running (``on_stop``, given the time the scheduler was made)."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.stopping = threading.Event()
        self.made_at = datetime.now(UTC)
        self.on_stop: list[Callable[[datetime], object]] = []
        self.watch = JobWatch()  # each job's outcome for the metrics, and whether one hangs (`coilguard scheduler`)
        self._thread: threading.Thread | None = None

    def start_in_thread(self) -> threading.Thread:
        """Run on a thread of its own, so that the main thread, where signals arrive, holds no lock of ours."""
        self._thread = threading.Thread(target=self.start, name="scheduler", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, wait: bool = False) -> None:
        """Ask running jobs to wind down (``stopping``) and stop scheduling; with ``wait``, return only once
        the jobs running now have finished. Never from a signal handler: shutting down takes locks (the
        scheduler's, its thread pool's) that the interrupted main thread may be holding. A hook that fails is
        logged: it must not keep the process from stopping."""
        self.stopping.set()
        for hook in self.on_stop:
            try:
                hook(self.made_at)
            except Exception:
                log.exception("a stop hook of the scheduler failed")
        # shutdown() takes only a scheduler that runs: one its thread is starting now (a signal during the start-up)
        # would start after this and run on
        while self._thread is not None and self._thread.is_alive() and not self.running:
            time.sleep(0.01)
        if self.running:
            self.shutdown(wait=wait)


def build_scheduler(settings: Settings, extra_jobs: dict[str, tuple[Job, object]] | None = None) -> Scheduler:
    from services.announce import run_announce
    from services.drift import run_drift
    from services.jobs import run_retrain, run_score

    scheduler = Scheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
    drift_lock = threading.Lock()  # the regular report and the catch-up's, one at a time: each loads a day of coils
    jobs: dict[str, tuple[Job, object]] = {
        "score": (run_score, IntervalTrigger(seconds=settings.score_every.total_seconds())),
        **{
            name: (job, crontab_trigger(cron))
            for name, job, cron in (
                ("retrain", functools.partial(run_retrain, stop=scheduler.stopping), settings.retrain_cron),
                ("drift", _one_at_a_time(drift_lock, run_drift), settings.drift_cron),
            )
            if cron != OFF
        },
        **(
            {
                "announce": (
                    functools.partial(run_announce, stop=scheduler.stopping),
                    IntervalTrigger(seconds=settings.announce_every.total_seconds()),
                )
            }
            if settings.announce_every is not None
            else {}
        ),
        **(extra_jobs or {}),
    }
    for name, (job, trigger) in jobs.items():
        # the announce pass and ModelScore also at the start: what a restart left waiting goes out, and their gauges
        # (unannounced decisions, scores, how long a model has broken the rule) read true at once, not one period on
        first = {"next_run_time": datetime.now(UTC)} if name in ("announce", "score") else {}
        scheduler.add_job(
            scheduler.watch.guard(name, job),
            trigger,
            args=[settings],
            id=name,
            name=name,
            misfire_grace_time=3600,
            **first,
        )
    if "drift" in jobs:  # once, as the scheduler starts: a restart over the report's time must not skip a day
        # judged when it runs, at the start, which is also when the regular job's next time is set (not here: the
        # scheduler may wait minutes for its schema): a start before 02:30 leaves that report to the regular job,
        # one after it to this
        catch_up = functools.partial(
            catch_up_drift, trigger=jobs["drift"][1], run=_one_at_a_time(drift_lock, run_drift), stop=scheduler.stopping
        )
        # no misfire limit: APScheduler's 1 s would drop it when the start is slower (waiting for the schema)
        scheduler.add_job(
            scheduler.watch.guard(DRIFT_CATCH_UP, catch_up), "date", args=[settings], id=DRIFT_CATCH_UP,
            name=DRIFT_CATCH_UP, misfire_grace_time=None,
        )  # fmt: skip
        scheduler.on_stop.append(functools.partial(release_catch_ups, settings))  # a catch-up cut short: no death
    return scheduler


def catch_up_drift(
    settings: Settings,
    *,
    trigger: CronTrigger,
    run: Callable[..., object],
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> list[datetime]:
    """Write the drift reports the schedule asked for in the last ``CATCH_UP_HORIZON`` that no report over a whole
    ``DRIFT_WINDOW`` stands for, oldest first, each over the window it would have had; the due times written.

    The schedule lives in memory: a scheduler stopped over the report's time (a rollout, a node drained at 02:30,
    a weekend's outage) comes back with the next day's time, and without this those days' reports would silently
    be missing from the drift history. A due time is written when no full report's window ends between it and
    the next one (the regular report ends seconds after it, a caught-up one at it, one by hand whenever it was
    made). Only times after the first full report count (not the days before an install), and with none at all
    only the last due one. A report that was skipped (no model, too few coils) writes nothing, so such a start
    looks again: cheap. A report that fails is logged, the others are written, and the job then fails.

    A mark in ``REPORT_DIR`` records, per due time, when each catch-up began; a report that ends, even with an
    error, or that a requested stop cut short (:func:`release_catch_ups`) takes its entry away. An entry left
    behind means the process died inside that report: killed by the memory limit, or stopped by force. After
    ``CATCH_UP_TRIES`` such deaths within the horizon, whichever reports they were, no catch-up is tried until
    they age out or the mark is removed, and the log says why: a report that does not fit in memory would not
    fit on any other day either, and trying at every restart would be a crash loop that starves ModelScore.
    """
    from services.db.engine import engine_for
    from services.drift import full_report_ends, restore_drift_gauge

    now = now or datetime.now(UTC)
    stop = stop or threading.Event()
    due_times = fire_times(trigger, now - CATCH_UP_HORIZON, now)
    with engine_for(settings.database_url) as engine:
        restore_drift_gauge(engine, settings.drift_window)  # the newest report's figure, until a newer one is written
        ends = full_report_ends(engine, settings.drift_window)
    missed = _missed(due_times, ends)
    mark = catch_up_mark(settings)
    with _MARK_LOCK:
        began = _read_mark(mark, now - CATCH_UP_HORIZON)
    deaths = sorted(t for times in began.values() for t in times)
    if missed and len(deaths) >= CATCH_UP_TRIES:
        log.error(
            "drift reports missed since %s are not written: catch-ups begun at %s never finished (the process was "
            "killed: out of memory, or stopped by force); none is tried until those are a week old or %s is "
            "removed", missed[0], ", ".join(deaths), mark,
        )  # fmt: skip
        return []
    written, failed = [], []
    for due in missed:
        if stop.is_set():
            break
        with _MARK_LOCK:
            if stop.is_set():  # seen under the lock a stop's release takes: no entry begins after it
                break
            log.info("no drift report since it was due at %s; writing it now", due)
            began = _read_mark(mark, now - CATCH_UP_HORIZON)
            began[due] = [*began.get(due, []), datetime.now(UTC).isoformat()]
            _write_mark(mark, began)
        try:
            run(settings, now=due)
            written.append(due)
        except Exception:  # an ordinary failure, worth another try at the next start; only a kill leaves the entry
            log.exception("the drift report due at %s failed; it is tried again at the next start", due)
            failed.append(due)
        finally:
            with _MARK_LOCK:
                began = _read_mark(mark, now - CATCH_UP_HORIZON)
                began.pop(due, None)
                _write_mark(mark, began)
    if failed:
        raise RuntimeError(f"drift reports due at {', '.join(map(str, failed))} failed (see above)")
    return written


def _missed(due_times: list[datetime], ends: list[datetime]) -> list[datetime]:
    """The due times no full report's window end stands for (see :func:`catch_up_drift`)."""
    if not ends:
        return due_times[-1:]
    nexts = [*due_times[1:], datetime.max.replace(tzinfo=UTC)]
    return [
        due
        for due, nxt in zip(due_times, nexts, strict=True)
        if due > ends[0] and not any(due <= e < nxt for e in ends)
    ]


def release_catch_ups(settings: Settings, since: datetime) -> None:
    """A stop was requested: catch-ups this process began (since ``since``) are not deaths, whatever kills it now
    (a rollout's SIGKILL once its grace period is over)."""
    mark = catch_up_mark(settings)
    with _MARK_LOCK:
        began = _read_mark(mark)
        kept = {due: [t for t in times if t < since.isoformat()] for due, times in began.items()}
        if kept != began:
            _write_mark(mark, {due: times for due, times in kept.items() if times})


def catch_up_mark(settings: Settings) -> Path:
    """Where the drift catch-ups in progress are recorded: beside the reports, which outlive the process."""
    from services.drift import DRIFT_DIR

    return settings.report_dir / DRIFT_DIR / "catch-up-in-progress.json"


def _read_mark(mark: Path, since: datetime | None = None) -> dict[datetime, list[str]]:
    """Due time (after ``since``) → when the catch-ups of it that never finished began. A mark that cannot be
    read counts as none (the worst case is one more try); one of the release before, a single due time, is read
    as it was meant; a time without a zone is UTC, as every time coilguard writes."""
    try:
        doc = json.loads(mark.read_text(encoding="utf-8"))
        if "due" in doc:  # {"due": …, "began": […]}
            doc = {"began": {doc["due"]: doc["began"]}}
        began = {_utc(datetime.fromisoformat(due)): [str(t) for t in times] for due, times in doc["began"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return {due: times for due, times in began.items() if since is None or due >= since}


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _write_mark(mark: Path, began: dict[datetime, list[str]]) -> None:
    from services.drift import write_atomic

    if not began:
        mark.unlink(missing_ok=True)
        return
    mark.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(mark, json.dumps({"began": {due.isoformat(): times for due, times in sorted(began.items())}}))


def fire_times(trigger: CronTrigger, since: datetime, now: datetime) -> list[datetime]:
    """The trigger's times after ``since`` and at or before ``now``, oldest first (APScheduler 3 only looks
    forward)."""
    times, fire = [], trigger.get_next_fire_time(None, since)
    while fire is not None and fire <= now:
        if fire > since:
            times.append(fire)
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    return times


def _one_at_a_time(lock: threading.Lock, job: Callable[..., object]) -> Callable[..., object]:
    def run(*args: object, **kwargs: object) -> object:
        with lock:
            return job(*args, **kwargs)

    return run


def scheduler_heartbeat(settings: Settings, scheduler: BaseScheduler) -> Heartbeat:
    """The scheduler's row in ``workers``, reporting each job's next run (``coilguard scheduler`` and ``up``)."""
    from services.db.engine import make_engine
    from services.db.repositories import worker_name
    from services.heartbeat import Heartbeat

    for job in scheduler.get_jobs():
        log.info("scheduled %s: %s", job.name, job.trigger)

    def status() -> dict:  # a job has no next_run_time until the scheduler has started
        return {job.name: {"next_run": str(getattr(job, "next_run_time", None))} for job in scheduler.get_jobs()}

    return Heartbeat(
        make_engine(settings.database_url), "scheduler", f"scheduler-{worker_name()}", status,
        settings.heartbeat_every.total_seconds(),
    ).start()  # fmt: skip


def wait_for_schema(settings: Settings, stop: StopSignals) -> bool:
    """Wait until the database answers at this release's schema; False when a stop is requested first.

    On Kubernetes the scheduler starts alongside the migrate Job and a database may be restarting: a
    process that died with a traceback would only be restarted into the same race.
    """
    from services.db.migrate import schema_problem

    said = None
    while problem := schema_problem(settings.database_url):
        if problem != said:
            log.warning("scheduler waiting for the database: %s (trying every %.0f s)", problem, SCHEMA_POLL_S)
            said = problem
        if stop.wait(SCHEMA_POLL_S):
            return False
    if said is not None:
        log.info("the database is ready; scheduling")
    return True


def run_scheduler(settings: Settings) -> None:
    """Until SIGTERM or Ctrl-C; then ``stopping`` is set and the process keeps its heartbeat row until the
    running job (a ReTrain finishing its epoch) is done. The scheduler loops on a thread so that the main
    thread, where signals arrive, holds no lock of its own when one does."""
    from services.metrics import serve_metrics, set_probes

    scheduler = build_scheduler(settings)
    stop = StopSignals().install()
    set_probes(
        live=scheduler.watch.hung,
        ready=lambda: None if scheduler.running else "waiting for the database at this release's schema",
    )
    serve_metrics(settings.metrics_port)
    if not wait_for_schema(settings, stop):
        return
    heartbeat = scheduler_heartbeat(settings, scheduler)
    try:
        scheduling = scheduler.start_in_thread()
        while scheduling.is_alive() and not stop.wait(1.0):
            pass
        scheduler.stop(wait=True)
        scheduling.join()
    finally:
        heartbeat.stop()
