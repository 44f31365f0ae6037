"""``coilguard scheduler`` starting and stopping: it waits for a database that is not migrated yet (on
Kubernetes it races the migrate Job) instead of dying, Ctrl-C stops it like SIGTERM (the ``stopping``
event a ReTrain watches is set), and its heartbeat row stays until the running job has finished.

Each test runs ``run_scheduler`` on pytest's main thread, where signal handlers live, and sends the
signal to this process; the original handlers are put back afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import func, select

from services import job_health, jobs, metrics
from services import scheduler as sched
from services.config import Settings, load_settings
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.models import Worker

GIVE_UP_S = 10.0


@pytest.fixture
def handlers() -> Iterator[None]:
    """Signal handlers as pytest had them; SIGINT ignored meanwhile, so that a scheduler without its own
    handler is not interrupted (it then keeps running: the test notices and stops it)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _settings(url: str) -> Settings:
    return load_settings(_env_file=None, database_url=url, retrain_cron="off", drift_cron="off")


def _heartbeats(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Worker.__table__)).scalar_one())
    finally:
        engine.dispose()


def _with_job(monkeypatch: pytest.MonkeyPatch, job: Callable[[sched.Scheduler], None]) -> list[sched.Scheduler]:
    """``run_scheduler`` builds its scheduler with one more job, handed that scheduler: due as soon as the
    scheduler starts, then hourly (repeating, as the real jobs: APScheduler cannot drop a one-off job that
    a shutdown overtakes)."""
    built: list[sched.Scheduler] = []
    build = sched.build_scheduler

    def with_job(settings: Settings) -> sched.Scheduler:
        scheduler = build(settings)
        scheduler.add_job(
            job, IntervalTrigger(hours=1), args=[scheduler], id="probe",
            next_run_time=datetime.now(UTC), misfire_grace_time=3600,
        )  # fmt: skip
        built.append(scheduler)
        return scheduler

    monkeypatch.setattr(sched, "build_scheduler", with_job)
    return built


def _in_background(action: Callable[[], None]) -> None:
    threading.Thread(target=action, daemon=True).start()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_the_scheduler_once_the_running_job_is_done_heartbeat_kept_till_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers: None, sig: signal.Signals
) -> None:
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    seen: dict[str, object] = {}
    running = threading.Event()

    def epochs(scheduler: sched.Scheduler) -> None:  # like ReTrain: stops at the next epoch after `stopping`
        running.set()
        seen["told_to_stop"] = scheduler.stopping.wait(GIVE_UP_S / 2)
        time.sleep(0.5)  # the epoch under way
        seen["heartbeats_while_finishing"] = _heartbeats(url)
        seen["finished"] = time.monotonic()

    built = _with_job(monkeypatch, epochs)

    def send_signal() -> None:
        assert running.wait(GIVE_UP_S)
        os.kill(os.getpid(), sig)
        time.sleep(GIVE_UP_S)
        built[0].stop()  # a scheduler that ignored the signal: end the test rather than hang

    _in_background(send_signal)
    started = time.monotonic()
    sched.run_scheduler(_settings(url))
    returned = time.monotonic()
    assert returned - started < GIVE_UP_S  # no deadlock: the signal came while the job was being submitted
    assert seen["told_to_stop"] is True  # the signal set `stopping`
    assert seen["heartbeats_while_finishing"] == 1  # the row stayed while the job finished
    assert returned >= seen["finished"]  # run_scheduler waited for the job
    assert _heartbeats(url) == 0  # and then removed the row


def test_a_signal_during_the_start_up_stops_the_scheduler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers: None
) -> None:
    """SIGTERM right after the pod starts (a rollout): it arrives while the scheduler's thread is starting, before
    there is a running scheduler to shut down, and must still end the process rather than wait for SIGKILL."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    built = _with_job(monkeypatch, lambda _: None)
    heartbeat = sched.scheduler_heartbeat

    def heartbeat_then_signal(settings: Settings, scheduler: sched.Scheduler):
        beat = heartbeat(settings, scheduler)
        start = scheduler.start

        def slow_start() -> None:  # a busy machine: the thread is scheduled late
            time.sleep(0.5)
            start()

        scheduler.start = slow_start  # type: ignore[method-assign]
        os.kill(os.getpid(), signal.SIGTERM)  # handled on this thread before the scheduler's thread starts
        return beat

    monkeypatch.setattr(sched, "scheduler_heartbeat", heartbeat_then_signal)

    def give_up() -> None:
        time.sleep(GIVE_UP_S)
        built[0].stop()  # a scheduler that lost the signal: end the test rather than hang

    _in_background(give_up)
    started = time.monotonic()
    sched.run_scheduler(_settings(url))
    assert time.monotonic() - started < GIVE_UP_S / 2
    assert _heartbeats(url) == 0


def test_the_scheduler_waits_for_the_schema_then_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, handlers: None
) -> None:
    url = f"sqlite:///{tmp_path / 'cg.db'}"  # nothing migrated yet: the migrate Job is still running
    monkeypatch.setattr(sched, "SCHEMA_POLL_S", 0.05, raising=False)
    caplog.set_level(logging.INFO, logger="services.scheduler")
    ran = threading.Event()
    _with_job(monkeypatch, lambda _: ran.set())

    def migrate_meanwhile_then_stop() -> None:
        deadline = time.monotonic() + GIVE_UP_S
        while not any("db upgrade" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        upgrade(url)
        if ran.wait(GIVE_UP_S):  # never once the test is over: pytest's SIGTERM would end the whole run
            os.kill(os.getpid(), signal.SIGTERM)

    _in_background(migrate_meanwhile_then_stop)
    sched.run_scheduler(_settings(url))
    assert ran.is_set()
    waiting = [r.getMessage() for r in caplog.records if "waiting for the database" in r.getMessage()]
    assert waiting and "run `coilguard db upgrade` first" in waiting[0]


def test_a_modelscore_pass_that_hangs_fails_the_schedulers_liveness_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers: None
) -> None:
    """The scheduler's /health/live answered 200 whatever its jobs did: a ModelScore waiting for ever (a lock, a
    hung socket) stopped every score with the pod reported healthy. Now the probe names the job once its run
    has gone on past its bound, so Kubernetes restarts the scheduler."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    now = [0.0]  # the watch's clock, moved by the test: no race with a busy machine
    monkeypatch.setattr(
        sched, "JobWatch", lambda: job_health.JobWatch({"score": timedelta(minutes=30)}, clock=lambda: now[0])
    )
    monkeypatch.setattr(metrics, "_PROBES", {})
    inside, release = threading.Event(), threading.Event()

    def hanging_score(settings: Settings) -> None:
        inside.set()
        release.wait(GIVE_UP_S)

    monkeypatch.setattr(jobs, "run_score", hanging_score)
    answers: dict[str, str | None] = {}

    def probe_then_stop() -> None:
        try:
            if inside.wait(GIVE_UP_S):  # ModelScore runs as the scheduler starts
                answers["at once"] = metrics._PROBES["live"]()
                now[0] = 31 * 60.0
                answers["half an hour on"] = metrics._PROBES["live"]()
        finally:
            release.set()
            os.kill(os.getpid(), signal.SIGTERM)

    _in_background(probe_then_stop)
    sched.run_scheduler(_settings(url))
    assert answers["at once"] is None
    assert answers["half an hour on"] == "job score has run for 1860 s (more than 1800 s)"


def test_a_drift_report_missed_while_the_scheduler_was_down_is_written_when_it_starts(tmp_path: Path) -> None:
    """The schedule lives in memory: a scheduler restarted over the report's time (02:30) comes back with the
    next day's. It writes the missed report once on starting, and only when none was written since it was due.
    Either way the drift gauge reads the last report's share again (it read 0 until the next report, and the drift
    alert resolved at every restart)."""
    from apscheduler.triggers.cron import CronTrigger
    from sqlalchemy import insert

    from services.db.models import DriftReport
    from services.metrics import METRICS

    url = f"sqlite:///{tmp_path / 'catch-up.db'}"
    upgrade(url)
    settings = _settings(url).model_copy(update={"drift_cron": "30 2 * * *"})
    trigger = CronTrigger.from_crontab("30 2 * * *", timezone="UTC")
    runs: list[datetime] = []
    now = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)

    def catch_up(at: datetime = now) -> list[datetime]:
        return sched.catch_up_drift(settings, trigger=trigger, run=lambda _, now: runs.append(now), now=at)

    def report_written(at: datetime, window: timedelta = settings.drift_window, share: float = 0.0) -> None:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(
                insert(DriftReport.__table__).values(
                    created_at=at, window_start=at - window, window_end=at, dataset_drift=share >= 0.2,
                    share_drifted=share,
                )
            )  # fmt: skip
        engine.dispose()

    assert sched.fire_times(trigger, now - timedelta(days=1), now) == [datetime(2026, 12, 7, 2, 30, tzinfo=UTC)]
    assert catch_up() == [datetime(2026, 12, 7, 2, 30, tzinfo=UTC)]  # none at all (a fresh install): the last only
    runs.clear()
    report_written(datetime(2026, 12, 6, 2, 31, tzinfo=UTC), share=0.35)  # yesterday's; today's 02:30 came and went
    METRICS.drift_share.set(0.0)  # a fresh process
    assert catch_up() == [datetime(2026, 12, 7, 2, 30, tzinfo=UTC)]
    assert [s.value for m in METRICS.drift_share.collect() for s in m.samples] == [0.35]
    assert runs == [datetime(2026, 12, 7, 2, 30, tzinfo=UTC)]  # the window the missed report would have had
    report_written(datetime(2026, 12, 7, 8, 0, tzinfo=UTC), timedelta(hours=1))  # `coilguard drift --window 1h`
    assert catch_up() == [datetime(2026, 12, 7, 2, 30, tzinfo=UTC)] and len(runs) == 2  # no stand-in for the day's
    report_written(datetime(2026, 12, 7, 2, 31, tzinfo=UTC))
    assert catch_up() == [] and len(runs) == 2  # written on time: nothing to catch up
    # down from the 8th's report to the 11th's morning: the three days' reports, oldest first, each its own window
    report_written(datetime(2026, 12, 8, 2, 30, 4, tzinfo=UTC))
    days = [datetime(2026, 12, d, 2, 30, tzinfo=UTC) for d in (9, 10, 11)]
    assert catch_up(datetime(2026, 12, 11, 9, tzinfo=UTC)) == days and runs[2:] == days
    for day in days[1:]:  # written, each ending at its due time; the 9th's failed: it is still missing
        report_written(day)
    assert catch_up(datetime(2026, 12, 11, 9, tzinfo=UTC)) == days[:1]
    # a fortnight away: the last week's seven, not more
    assert catch_up(datetime(2026, 12, 22, 9, tzinfo=UTC)) == [datetime(2026, 12, d, 2, 30, tzinfo=UTC) for d in
                                                                 range(16, 23)]  # fmt: skip
    jobs = {job.id for job in sched.build_scheduler(settings).get_jobs()}
    assert {"drift", sched.DRIFT_CATCH_UP} <= jobs
    assert sched.DRIFT_CATCH_UP not in {job.id for job in sched.build_scheduler(_settings(url)).get_jobs()}


def test_a_drift_catch_up_that_killed_its_process_is_not_tried_at_every_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A report that exceeds the memory limit kills the scheduler; the catch-up must not repeat it at each restart
    (a crash loop). One death is tried again (it may have been a rollout's SIGKILL); a report that fails with an
    error is an ordinary failure and is tried at the next start."""
    from apscheduler.triggers.cron import CronTrigger

    url = f"sqlite:///{tmp_path / 'killed.db'}"
    upgrade(url)
    settings = _settings(url).model_copy(update={"drift_cron": "30 2 * * *", "report_dir": tmp_path / "reports"})
    trigger = CronTrigger.from_crontab("30 2 * * *", timezone="UTC")
    due = datetime(2026, 12, 7, 2, 30, tzinfo=UTC)
    mark = sched.catch_up_mark(settings)
    marks: list[str] = []  # the mark as each run saw it: what a process killed inside that run leaves behind

    def catch_up(now: datetime = datetime(2026, 12, 7, 9, tzinfo=UTC), fail: bool = False) -> list[datetime]:
        def run(_: Settings, now: datetime) -> None:
            marks.append(mark.read_text())
            if fail:
                raise RuntimeError("database gone")

        return sched.catch_up_drift(settings, trigger=trigger, run=run, now=now)

    with pytest.raises(RuntimeError, match="failed"):  # logged, the others written, then the job fails
        catch_up(fail=True)
    assert len(marks) == 1 and not mark.exists()  # marked while it ran; an error is no death: the mark goes
    assert catch_up() == [due] and len(marks) == 2 and not mark.exists()

    mark.write_text(marks[-1])  # killed inside the report: the next start tries once more
    assert catch_up() == [due] and len(marks) == 3
    mark.write_text(marks[-1])  # killed again
    caplog.set_level(logging.ERROR, logger="services.scheduler")
    assert catch_up() == [] and len(marks) == 3  # two deaths: no catch-up
    assert "never finished" in caplog.text
    # nor the next day's: a report that does not fit in memory would not fit then either
    assert catch_up(now=datetime(2026, 12, 8, 9, tzinfo=UTC)) == [] and len(marks) == 3
    # a week on, the deaths have aged out
    assert catch_up(now=datetime(2026, 12, 15, 9, tzinfo=UTC)) == [due + timedelta(days=8)] and len(marks) == 4
    mark.write_text("not json")  # unreadable: one more try is the lesser harm
    assert catch_up() == [due] and len(marks) == 5
    mark.write_text(json.dumps({"due": due.isoformat(), "began": ["a", "b"]}))  # the release before's mark: read
    assert catch_up() == [] and len(marks) == 5
    mark.write_text(json.dumps({"began": {"2026-12-07T02:30:00": ["a", "b"]}}))  # no zone: UTC, not a crash
    assert catch_up() == [] and len(marks) == 5

    # a stop was requested while this process's catch-up ran: whatever kills it then is not counted
    started, earlier = datetime.now(UTC), (datetime.now(UTC) - timedelta(days=1)).isoformat()
    mark.write_text(json.dumps({"began": {due.isoformat(): [earlier, started.isoformat()]}}))
    sched.release_catch_ups(settings, started)
    assert json.loads(mark.read_text()) == {"began": {due.isoformat(): [earlier]}}  # the earlier death stays


def test_the_drift_catch_up_runs_however_long_the_scheduler_takes_to_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``run_scheduler`` builds the scheduler, then waits for the schema (on Kubernetes, for the migrate Job):
    a one-off job due at build time must still run when the scheduler starts seconds later (APScheduler drops a
    job more than its misfire grace time late, 1 s by default)."""
    url = f"sqlite:///{tmp_path / 'slow-start.db'}"
    upgrade(url)
    settings = _settings(url).model_copy(
        update={"drift_cron": "30 2 * * *", "report_dir": tmp_path / "reports", "model_dir": tmp_path / "models"}
    )
    scheduler = sched.build_scheduler(settings)
    time.sleep(1.5)  # the schema wait
    caplog.set_level(logging.INFO, logger="services.scheduler")
    caplog.set_level(logging.INFO, logger="services.job_health")  # each job's "starting" and "done"
    _in_background(scheduler.start)
    try:
        deadline = time.monotonic() + GIVE_UP_S
        while f"job {sched.DRIFT_CATCH_UP} done" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.stop(wait=True)
    assert f"job {sched.DRIFT_CATCH_UP} done" in caplog.text, caplog.text[-2000:]


def test_the_drift_gauge_is_the_newest_full_reports_however_many_short_ones_came_after(tmp_path: Path) -> None:
    """Reports by hand over an hour are not the day's figure, even 150 of them after the last daily one."""
    from sqlalchemy import insert

    from services.db.models import DriftReport
    from services.drift import restore_drift_gauge

    url = f"sqlite:///{tmp_path / 'gauge.db'}"
    upgrade(url)
    engine = make_engine(url)
    day = datetime(2026, 12, 7, 2, 30, tzinfo=UTC)
    rows = [dict(created_at=day, window_start=day - timedelta(days=1), window_end=day, share_drifted=0.4)]
    rows += [
        dict(created_at=at, window_start=at - timedelta(hours=1), window_end=at, share_drifted=0.05)
        for at in (day + timedelta(minutes=5 * i) for i in range(1, 151))
    ]
    with engine.begin() as conn:
        conn.execute(insert(DriftReport.__table__), [{**r, "dataset_drift": r["share_drifted"] >= 0.2} for r in rows])
    assert restore_drift_gauge(engine, timedelta(days=1)) == 0.4
    assert restore_drift_gauge(engine) == 0.05  # no window given: the newest of any length
    engine.dispose()


def test_stopping_the_scheduler_releases_the_catch_ups_it_began(tmp_path: Path) -> None:
    """`coilguard scheduler` and `coilguard up` stop it the same way: whatever kills the process after a requested
    stop (a rollout's SIGKILL at the end of its grace period) is not counted as a catch-up's death."""
    url = f"sqlite:///{tmp_path / 'stop.db'}"
    upgrade(url)
    settings = _settings(url).model_copy(update={"drift_cron": "30 2 * * *", "report_dir": tmp_path / "reports"})
    scheduler = sched.build_scheduler(settings)
    mark, due = sched.catch_up_mark(settings), datetime(2026, 12, 7, 2, 30, tzinfo=UTC)
    earlier = (scheduler.made_at - timedelta(days=1)).isoformat()
    sched._write_mark(mark, {due: [earlier, (scheduler.made_at + timedelta(seconds=1)).isoformat()]})
    scheduler.stop()
    assert scheduler.stopping.is_set() and sched._read_mark(mark) == {due: [earlier]}
