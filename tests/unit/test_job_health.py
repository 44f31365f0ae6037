"""The scheduler's jobs are watched: a job failing at every run shows in a gauge an alert reads (it used to
show only in the log), and a short job that hangs makes the scheduler's liveness probe fail."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY

from services import metrics
from services.job_health import JobWatch


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_failures_in_a_row_are_counted_until_a_run_succeeds() -> None:
    outcomes = iter([RuntimeError("grant revoked"), RuntimeError("grant revoked"), None, RuntimeError("again")])

    def score(settings: object) -> None:
        if (failure := next(outcomes)) is not None:
            raise failure

    job = JobWatch().guard("score-test", score)
    assert _sample("coilguard_scheduler_job_failures_in_a_row", task="score-test") == 0  # at 0 before any run
    before = _sample("coilguard_scheduler_job_runs_total", task="score-test", outcome="failed") or 0.0
    job(None)
    job(None)  # never raised: the scheduler goes on to the next time
    assert _sample("coilguard_scheduler_job_failures_in_a_row", task="score-test") == 2
    job(None)
    assert _sample("coilguard_scheduler_job_failures_in_a_row", task="score-test") == 0
    job(None)
    assert _sample("coilguard_scheduler_job_failures_in_a_row", task="score-test") == 1
    assert _sample("coilguard_scheduler_job_runs_total", task="score-test", outcome="failed") == before + 3
    assert _sample("coilguard_scheduler_job_runs_total", task="score-test", outcome="done") >= 1


def test_a_short_job_running_past_its_bound_is_a_hang_a_long_one_is_not() -> None:
    now = [0.0]
    watch = JobWatch({"score": timedelta(minutes=30)}, clock=lambda: now[0])
    release = threading.Event()
    started = threading.Barrier(3)

    def blocked(settings: object) -> None:
        started.wait(5)
        release.wait(5)

    runs = [threading.Thread(target=watch.guard(name, blocked), args=[None]) for name in ("score", "retrain")]
    for run in runs:
        run.start()
    started.wait(5)
    try:
        now[0] = 30 * 60.0
        assert watch.hung() is None  # at its bound, not past it
        now[0] = 10 * 3600.0  # ReTrain runs for hours: no bound
        assert watch.hung() == "job score has run for 36000 s (more than 1800 s)"
    finally:
        release.set()
        for run in runs:
            run.join(5)
    assert watch.hung() is None  # the run ended: live again


def test_the_scheduler_probe_answers_503_naming_the_hung_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Kubernetes sees on the metrics port (the probe run_scheduler installs)."""
    now = [0.0]
    watch = JobWatch({"announce": timedelta(seconds=1)}, clock=lambda: now[0])
    monkeypatch.setattr(metrics, "_PROBES", {})
    metrics.set_probes(live=watch.hung)
    app = metrics._with_probes(lambda environ, start_response: [])
    seen: list[str] = []

    def get() -> tuple[str, bytes]:
        body = b"".join(app({"PATH_INFO": "/health/live"}, lambda status, headers: seen.append(status)))
        return seen[-1], body

    inside = threading.Event()
    release = threading.Event()

    def announce(settings: object) -> None:
        inside.set()
        release.wait(5)

    run = threading.Thread(target=watch.guard("announce", announce), args=[None])
    run.start()
    try:
        assert inside.wait(5)
        assert get() == ("200 OK", b"ok\n")
        now[0] = 2.0
        status, body = get()
        assert status.startswith("503") and b"job announce has run for 2 s" in body
    finally:
        release.set()
        run.join(5)
