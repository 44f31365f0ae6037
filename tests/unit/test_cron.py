"""Crontab lines fire on the days cron and Kubernetes fire them (``services/cron.py``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.config import load_settings
from services.cron import crontab_trigger, weekdays
from services.scheduler import build_scheduler

SUNDAY_NOON = datetime(2026, 11, 22, 12, tzinfo=UTC)


def _days(line: str, n: int = 7) -> list[str]:
    """The weekdays of the next ``n`` firings after a Sunday noon."""
    trigger, at, fired = crontab_trigger(line), SUNDAY_NOON, []
    for _ in range(n):
        at = trigger.get_next_fire_time(None, at + timedelta(seconds=1))
        fired.append(at.strftime("%a"))
    return fired


def test_the_schedulers_retrain_fires_on_mondays_as_the_cronjob_with_the_same_line_does(tmp_path: Path) -> None:
    """APScheduler's own `from_crontab` read the weekday 1 as Tuesday (it counts from Monday)."""
    settings = load_settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'cg.db'}", drift_cron="0 4 * * 0")
    assert settings.retrain_cron == "0 3 * * 1"
    jobs = {job.id: job for job in build_scheduler(settings).get_jobs()}
    retrain = jobs["retrain"].trigger.get_next_fire_time(None, SUNDAY_NOON)
    drift = jobs["drift"].trigger.get_next_fire_time(None, SUNDAY_NOON - timedelta(days=1))
    assert retrain == datetime(2026, 11, 23, 3, tzinfo=UTC) and retrain.strftime("%a") == "Mon"
    assert drift == datetime(2026, 11, 22, 4, tzinfo=UTC) and drift.strftime("%a") == "Sun"


@pytest.mark.parametrize(
    ("line", "days"),
    [
        ("0 3 * * 0", ["Sun"]),
        ("0 3 * * 7", ["Sun"]),
        ("0 3 * * 1-5", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("0 3 * * mon-fri", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
        ("0 3 * * 5-7", ["Sun", "Fri", "Sat"]),
        ("0 3 * * 0,6", ["Sun", "Sat"]),
        ("0 3 * * */2", ["Sun", "Tue", "Thu", "Sat"]),
        ("0 3 * * 2/3", ["Tue", "Fri"]),
        ("30 2 * * *", ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]),
    ],
)
def test_weekdays_are_counted_from_sunday_as_cron_counts_them(line: str, days: list[str]) -> None:
    assert sorted(set(_days(line, 14)), key=["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"].index) == days


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("0 3 1 * 1", "not both"),
        ("0 3 * * 8", "is not a day"),
        ("0 3 * * 5-2", "is not a range cron reads"),
        ("0 3 * * */0", "is not a range cron reads"),
        ("0 3 * * funday", "is not a number or a day's name"),
        ("0 3 * *", "five fields"),
    ],
)
def test_a_line_cron_would_read_otherwise_or_not_at_all_is_refused(line: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        crontab_trigger(line)
    with pytest.raises(ValueError, match=words):
        load_settings(_env_file=None, retrain_cron=line)


def test_a_weekday_list_reads_as_day_names() -> None:
    assert weekdays("1") == "mon" and weekdays("0,7") == "sun" and weekdays("*") == "*"
