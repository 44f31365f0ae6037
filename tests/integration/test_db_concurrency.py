"""Two writers at once on a real PostgreSQL: feedback dated by its statement, and a promotion that waits for the
ModelScore pass in flight before it clears the version's tallies."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Connection, Engine, select, text

from services.db.engine import make_engine
from services.db.repositories import SCORE_LOCK_NAMESPACE, SqlModelRegistry, latest_feedback, lock_score_tallies

TICK_S = 0.02  # apart in time, so that the two transactions' clocks cannot read the same microsecond
WAIT_S = 10.0


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def add_coil(engine: Engine, coil_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO coils (coil_id, line, matrix) VALUES (:c, 'galv-1', '\\x00')"), {"c": coil_id})


def operator_word(engine: Engine, coil_id: str) -> str:
    latest = latest_feedback(engine)
    with engine.connect() as conn:
        return conn.execute(select(latest.c.label).where(latest.c.coil_id == coil_id)).scalar_one()


def test_the_feedback_committed_last_wins_though_its_transaction_began_first(engine: Engine) -> None:
    """Two operator tools, autocommit off: A reads, B says NOK and commits, then A says OK and commits.
    With ``now()`` A's row was dated at A's first read, before B's, and B's older word won."""
    add_coil(engine, "C-two-tools")
    insert = "INSERT INTO feedback (coil_id, label, operator) VALUES ('C-two-tools', :label, :operator)"
    with engine.connect() as tool_a:
        tool_a.execute(text("SELECT count(*) FROM feedback WHERE coil_id = 'C-two-tools'"))  # A's transaction begins
        time.sleep(TICK_S)
        with engine.begin() as tool_b:
            tool_b.execute(text(insert), {"label": "NOK", "operator": "ben"})
        time.sleep(TICK_S)
        tool_a.execute(text(insert), {"label": "OK", "operator": "anna"})
        tool_a.commit()
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT operator FROM feedback WHERE coil_id = 'C-two-tools' ORDER BY created_at, id")
        ).scalars()
        assert list(rows) == ["ben", "anna"]
    assert operator_word(engine, "C-two-tools") == "OK"


def waiting_for_score_lock(conn: Connection) -> bool:
    """Whether some session of this database waits for the ModelScore lock (held elsewhere)."""
    return bool(
        conn.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND classid = :ns AND objid = 0"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"ns": SCORE_LOCK_NAMESPACE},
        ).scalar_one()
    )


def wait_until(done: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.01)
    return False


def test_a_promotion_waits_for_the_score_pass_in_flight_before_clearing_the_tallies(engine: Engine) -> None:
    """A pass computed its differences under the old ``promoted_at``; had the promotion cleared the tallies
    meanwhile, the pass would add them back after, and the new window would start with the old votes."""
    registry = SqlModelRegistry(engine)
    model = registry.add(name="race-cnn", kind="cnn", version=1, artifact_uri="", sha256="")
    errors: list[BaseException] = []

    def promote() -> None:
        try:
            registry.promote(model.id)
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    promoting = threading.Thread(target=promote)
    with engine.connect() as score_pass, engine.connect() as watcher:
        lock_score_tallies(score_pass)  # a pass in flight holds the lock
        promoting.start()
        assert wait_until(lambda: not promoting.is_alive() or waiting_for_score_lock(watcher))
        blocked = promoting.is_alive()
        score_pass.execute(
            text(
                "INSERT INTO score_tallies (model_id, n_coils, n_correct, tp, predicted_nok, actual_nok)"
                " VALUES (:m, 5, 4, 1, 1, 1)"
            ),
            {"m": model.id},
        )
        watcher.rollback()
        status = watcher.execute(text("SELECT status FROM models WHERE id = :m"), {"m": model.id}).scalar_one()
        score_pass.commit()
    promoting.join(WAIT_S)
    assert not promoting.is_alive() and not errors, errors
    assert blocked and status == "candidate"  # the promotion waited for the pass, uncommitted
    with engine.connect() as conn:
        tallies = conn.execute(text("SELECT count(*) FROM score_tallies WHERE model_id = :m"), {"m": model.id})
        assert tallies.scalar_one() == 0  # cleared after the pass: the window starts at the promotion
    assert registry.get(model.id).status == "active"
