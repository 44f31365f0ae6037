"""ModelScore's incremental tallies on PostgreSQL: equal to a full recount, also with passes racing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from score_scenario import History, run_history
from sqlalchemy import text

from services.db import repositories
from services.db.engine import make_engine
from services.db.migrate import upgrade


def _engine(pg_database_factory: Callable[[], str]):
    url = pg_database_factory()
    upgrade(url)
    return make_engine(url)


def test_tallies_equal_a_full_recount_on_postgresql(pg_database_factory: Callable[[], str]) -> None:
    history = run_history(_engine(pg_database_factory), seed=1)
    with history.engine.begin() as conn:  # a clean-up that empties the table: the tallies start again too
        conn.execute(text("TRUNCATE feedback"))
    assert history.check()["a/v1"] == (0, 0, 0, 0, 0)


def test_passes_racing_each_other_and_the_operators_count_every_row_once(
    pg_database_factory: Callable[[], str],
) -> None:
    history = History(_engine(pg_database_factory), seed=2)
    history.assess(200, {"a": 1, "img": 1})
    errors: list[BaseException] = []

    def keep_scoring() -> None:
        try:
            for _ in range(15):
                history.store.count_new_feedback()
        except BaseException as exc:  # surfaced below: a thread's assertion must fail the test
            errors.append(exc)

    scorers = [threading.Thread(target=keep_scoring) for _ in range(3)]
    for t in scorers:
        t.start()
    for _ in range(20):
        history.give_feedback(10)
    for t in scorers:
        t.join()
    assert not errors
    assert history.check()["a/v1"][0] > 100


def test_a_pass_blocked_by_an_edit_left_open_gives_up_with_the_reason_and_the_next_counts_it(
    pg_database_factory: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's psql session that edited a feedback row and went to lunch held ModelScore's claim of that row
    forever: no pass finished and the scores stood still, with nothing in the log. Now the pass gives up after
    ``SCORE_ROW_WAIT_S`` saying what holds it, counts nothing, and the pass after the edit ends counts every row."""
    monkeypatch.setattr(repositories, "SCORE_ROW_WAIT_S", 1)
    history = History(_engine(pg_database_factory), seed=3)
    history.assess(20, {"a": 1, "img": 1})
    history.give_feedback(5)
    with history.engine.connect() as editor:
        editor.execute(text("UPDATE feedback SET comment = 'checking' WHERE id = (SELECT min(id) FROM feedback)"))
        started = time.monotonic()
        with pytest.raises(repositories.ScorePassBlocked, match="feedback row another session holds"):
            history.store.count_new_feedback()
        assert time.monotonic() - started < 10
        editor.rollback()
    with history.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM score_passes")).scalar_one() == 0  # the failed pass left nothing
    assert history.store.count_new_feedback() == 5
    history.check()
