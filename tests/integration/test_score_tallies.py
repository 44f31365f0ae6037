"""ModelScore's incremental tallies on PostgreSQL: equal to a full recount, also with passes racing."""

from __future__ import annotations

import threading
from collections.abc import Callable

from score_scenario import History, run_history
from sqlalchemy import text

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
