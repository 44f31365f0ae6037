"""Heartbeat rows: what the status page says about each long-running process."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select

from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.models import Worker
from services.heartbeat import Heartbeat


def test_rows_of_long_dead_processes_are_removed_when_a_process_starts(tmp_path: Path) -> None:
    """A killed process cannot remove its row: it shows as dead for a week, so the crash can be seen, and then
    goes, instead of the status page growing with every crash."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(Worker),
            [
                {"worker_id": f"api-host:{pid}", "kind": "api", "host": "host", "pid": pid, "started_at": seen,
                 "seen_at": seen, "info": {}}
                for pid, seen in ((1, now - timedelta(days=8)), (2, now - timedelta(days=6)))
            ],
        )  # fmt: skip
    beat = Heartbeat(engine, "assess", "assess-0", every_s=60).start()
    try:
        with engine.connect() as conn:
            left = sorted(conn.execute(select(Worker.worker_id)).scalars())
    finally:
        beat.stop()
        engine.dispose()
    assert left == ["api-host:2", "assess-0"]


def test_a_process_started_while_the_database_was_away_is_listed_once_it_is_back(tmp_path: Path) -> None:
    """The API comes up during an outage (here: before its schema exists) and must appear on the status page
    when the database can take its row, not never."""
    url = f"sqlite:///{tmp_path / 'late.db'}"
    engine = make_engine(url)
    beat = Heartbeat(engine, "api", "api-0", every_s=0.1).start(first_must_succeed=False)
    try:
        assert beat.failing
        upgrade(url)
        deadline = time.monotonic() + 10
        while beat.failing and time.monotonic() < deadline:
            time.sleep(0.05)
        with engine.connect() as conn:
            listed = list(conn.execute(select(Worker.worker_id)).scalars())
    finally:
        beat.stop()
        engine.dispose()
    assert listed == ["api-0"]


def test_a_process_restarted_under_the_same_id_shows_its_own_start(tmp_path: Path) -> None:
    """A pod restarted after a crash keeps its hostname and pid 1 (an assess pod its client id): the row's upsert
    kept the crashed process's `started_at` and host, so /status hid the restart it is there to show."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    engine = make_engine(url)
    crashed = datetime.now(UTC) - timedelta(hours=3)
    with engine.begin() as conn:
        conn.execute(
            insert(Worker),
            [{"worker_id": "assess-0", "kind": "assess", "host": "old-node", "pid": 1, "started_at": crashed,
              "seen_at": crashed, "info": {}}],
        )  # fmt: skip
    beat = Heartbeat(engine, "assess", "assess-0", every_s=60)
    beat.beat()
    with engine.connect() as conn:
        row = conn.execute(select(Worker)).one()
    engine.dispose()
    assert row.started_at.replace(tzinfo=UTC) == beat.started_at and row.host != "old-node"
