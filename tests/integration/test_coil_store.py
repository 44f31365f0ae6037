"""The assess write on a real PostgreSQL: a batch's votes go in by ``COPY`` and must come out as given,
fail as SQLAlchemy errors do, and take their batch's coils with them when they fail."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from score_scenario import assessed_coil
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError

from ml.ensemble import MemberVote
from services.db.engine import make_engine
from services.db.repositories import SqlCoilStore, SqlModelRegistry


@pytest.fixture(scope="module")
def engine(pg_url: str) -> Iterator[Engine]:
    # a session time zone other than UTC, as a server's may be: a naive timestamp would be read in it
    engine = make_engine(pg_url, connect_args={"options": "-c timezone=Asia/Tokyo"})
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def model_ids(engine: Engine) -> dict[tuple[str, int], int]:
    registry = SqlModelRegistry(engine)
    added = [
        registry.add(name=name, kind=kind, version=1, artifact_uri=f"{name}/1", sha256="0" * 64)
        for name, kind in (("store-cnn", "cnn"), ("store-img", "ssim_ae"))
    ]
    return {(record.name, record.version): record.id for record in added}


def votes_of(engine: Engine, prefix: str) -> list[tuple]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                text(
                    "SELECT a.coil_id, m.name, a.label, a.p_nok, a.confidence, a.created_at FROM assessments a"
                    " JOIN models m ON m.id = a.model_id WHERE a.coil_id LIKE :p ORDER BY a.coil_id, m.name"
                ),
                {"p": f"{prefix}%"},
            )
        ]


def coils_of(engine: Engine, prefix: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(text("SELECT coil_id FROM coils WHERE coil_id LIKE :p"), {"p": f"{prefix}%"}).scalars()
        )


def test_votes_come_back_as_given_abstentions_and_time_zones_included(engine: Engine, model_ids: dict) -> None:
    at = datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=UTC)
    voted = [MemberVote("store-cnn", 1, "NOK", 0.875, 0.75), MemberVote("store-img", 1, "ABSTAIN", None, None)]
    batch = [
        assessed_coil("S1-aware", voted, at),
        assessed_coil("S1-naive", voted, at.replace(tzinfo=None)),  # taken as UTC, as UtcDateTime takes it
        assessed_coil("S1-cest", voted, at.astimezone(timezone(timedelta(hours=2)))),
    ]
    statements: list[str] = []

    def record(conn, cursor, statement, *_):
        statements.append(statement.lstrip().upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert SqlCoilStore(engine).save_assessed(batch, model_ids) == {"S1-aware", "S1-naive", "S1-cest"}
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert statements and not any(s.startswith("INSERT INTO ASSESSMENTS") for s in statements)  # COPY, not a row each
    expected = [
        (coil_id, name, label, p_nok, confidence, at)
        for coil_id in sorted(["S1-aware", "S1-naive", "S1-cest"])
        for name, label, p_nok, confidence in [("store-cnn", "NOK", 0.875, 0.75), ("store-img", "ABSTAIN", None, None)]
    ]
    assert votes_of(engine, "S1-") == expected


def test_a_coil_already_on_record_gets_no_second_votes(engine: Engine, model_ids: dict) -> None:
    store = SqlCoilStore(engine)
    vote = [MemberVote("store-cnn", 1, "OK", 0.125, 0.75)]
    assert store.save_assessed([assessed_coil("S2-1", vote)], model_ids) == {"S2-1"}
    again = [assessed_coil("S2-1", vote), assessed_coil("S2-2", vote)]
    assert store.save_assessed(again, model_ids) == {"S2-2"}
    assert [row[0] for row in votes_of(engine, "S2-")] == ["S2-1", "S2-2"]


def test_a_refused_vote_is_an_integrity_error_and_writes_none_of_its_batch(engine: Engine, model_ids: dict) -> None:
    unknown_model = {**model_ids, ("store-cnn", 1): max(model_ids.values()) + 1000}
    batch = [assessed_coil(f"S3-{i}", [MemberVote("store-cnn", 1, "OK", 0.25, 0.5)]) for i in range(3)]
    with pytest.raises(IntegrityError, match="foreign key"):
        SqlCoilStore(engine).save_assessed(batch, unknown_model)
    assert coils_of(engine, "S3-") == []
    assert SqlCoilStore(engine).save_assessed(batch, model_ids) == {"S3-0", "S3-1", "S3-2"}  # the pool recovered


def test_losing_the_server_mid_write_is_an_operational_error_that_invalidates_the_connection(
    engine: Engine, model_ids: dict
) -> None:
    """What the worker retries on: an outage, told apart from a refused row, with nothing half-written."""
    own = make_engine(engine.url.render_as_string(hide_password=False), pool_size=1)

    def kill_after_the_coils(conn, cursor, statement, *_):  # the votes' COPY is next
        if statement.lstrip().upper().startswith("INSERT INTO COILS"):
            with engine.begin() as admin:
                admin.execute(
                    text("SELECT pg_terminate_backend(:pid)"),
                    {"pid": conn.connection.dbapi_connection.info.backend_pid},
                )

    invalidated: list[BaseException | None] = []
    event.listen(own, "after_cursor_execute", kill_after_the_coils)
    event.listen(own, "invalidate", lambda _dbapi, _record, exc: invalidated.append(exc))
    batch = [assessed_coil("S4-1", [MemberVote("store-cnn", 1, "OK", 0.25, 0.5)])]
    try:
        with pytest.raises(OperationalError) as raised:
            SqlCoilStore(own).save_assessed(batch, model_ids)
        assert raised.value.connection_invalidated
        assert raised.value.statement.startswith("COPY assessments")  # the votes' error, not the rollback's
        assert invalidated == [raised.value.orig]  # the pooled connection is thrown away
        event.remove(own, "after_cursor_execute", kill_after_the_coils)
        assert coils_of(engine, "S4-") == []
        assert SqlCoilStore(own).save_assessed(batch, model_ids) == {"S4-1"}  # a fresh connection next time
    finally:
        own.dispose()


def test_the_stored_readings_come_back_only_when_asked_and_a_cut_short_one_as_none(
    engine: Engine, model_ids: dict
) -> None:
    """The worker's look-up tells a copy of a coil from another coil under its id by the readings; the announce pass
    and the held decisions' retries must not pay for 19 KB a coil, and readings of another length (a row written
    by hand) must not break a batch: they compare with nothing."""
    import numpy as np

    store = SqlCoilStore(engine)
    votes = [MemberVote("store-cnn", 1, "OK", 0.1, 0.9)]
    store.save_assessed([assessed_coil("RD-1", votes), assessed_coil("RD-2", votes)], model_ids)
    with engine.begin() as conn:
        conn.execute(text("UPDATE coils SET matrix = '\\x00010203'::bytea WHERE coil_id = 'RD-2'"))
    plain, full = store.decided(["RD-1", "RD-2"]), store.decided(["RD-1", "RD-2"], with_matrix=True)
    assert plain["RD-1"].matrix is None and plain["RD-1"].label == "OK"
    np.testing.assert_array_equal(full["RD-1"].matrix, np.zeros((264, 18), np.float32))
    assert full["RD-2"].matrix is None and full["RD-2"].label == "OK"
