"""Alembic revision 0001 on a real PostgreSQL: the tables, their constraints, and no drift from the models."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cli_runner import coilguard
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import IntegrityError
from tcp_proxy import TcpProxy

from services.db import migrate
from services.db.engine import make_engine, session_factory
from services.db.models import OPERATIONAL_TABLE_NAMES, TABLE_NAMES, Base, Coil, Feedback

SEVEN = set(TABLE_NAMES)
ALL_TABLES = SEVEN | set(OPERATIONAL_TABLE_NAMES)
HEAD = migrate.head()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def url(pg_database_factory: Callable[[], str]) -> str:
    url = pg_database_factory()
    assert migrate.upgrade(url) == HEAD
    return url


@pytest.fixture(scope="module")
def engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


def run(engine: Engine, sql: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def refused(engine: Engine, sql: str, **params: object) -> None:
    with pytest.raises(IntegrityError):
        run(engine, sql, **params)


def add_coil(engine: Engine, coil_id: str) -> None:
    run(engine, "INSERT INTO coils (coil_id, line, matrix) VALUES (:c, 'galv-1', '\\x00')", c=coil_id)


def add_model(engine: Engine, name: str, version: int, status: str) -> int:
    with engine.begin() as conn:
        return conn.execute(
            text("INSERT INTO models (name, kind, version, status) VALUES (:n, 'cnn', :v, :s) RETURNING id"),
            {"n": name, "v": version, "s": status},
        ).scalar_one()


def test_upgrade_creates_the_seven_tables(engine: Engine, url: str) -> None:
    assert set(inspect(engine).get_table_names()) == ALL_TABLES | {"alembic_version"}
    assert migrate.current(url) == migrate.head() == HEAD
    assert migrate.upgrade(url) == HEAD  # at head already: nothing happens


def test_plain_sql_feedback_insert_works(engine: Engine) -> None:
    add_coil(engine, "C-2026-000123")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO feedback (coil_id, label, operator) VALUES ('C-2026-000123', 'NOK', 'anna')"))
        row = conn.execute(
            text("SELECT id, label, operator, comment, created_at FROM feedback WHERE coil_id = 'C-2026-000123'")
        ).one()
    assert row.id >= 1 and row.label == "NOK" and row.operator == "anna" and row.comment is None
    assert row.created_at.tzinfo is not None


@pytest.mark.parametrize("label", ["ok", "MAYBE", "ABSTAIN"])
def test_feedback_label_other_than_ok_nok_is_refused(engine: Engine, label: str) -> None:
    add_coil(engine, f"C-label-{label}")
    refused(
        engine, "INSERT INTO feedback (coil_id, label, operator) VALUES (:c, :l, 'anna')", c=f"C-label-{label}", l=label
    )


def test_feedback_for_an_unknown_coil_is_refused(engine: Engine) -> None:
    refused(engine, "INSERT INTO feedback (coil_id, label, operator) VALUES ('C-unknown', 'OK', 'anna')")


def test_autogenerate_finds_no_difference_between_models_and_migrations(engine: Engine, url: str) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []
    migrate.check(url)  # through env.py, as `alembic revision --autogenerate` compares


def _catalog(conn: Connection) -> dict[str, object]:
    """What PostgreSQL itself says about the schema, beyond what autogenerate compares
    (CHECK constraints, index predicates, identity columns)."""
    columns = conn.execute(
        text(
            "SELECT table_name, column_name, data_type, character_maximum_length, is_nullable,"
            " column_default, is_identity, identity_generation FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name <> 'alembic_version'"
            " ORDER BY table_name, column_name"
        )
    ).all()
    constraints = conn.execute(
        text(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> 'alembic_version'"
            " ORDER BY 1, 2"
        )
    ).all()
    indexes = conn.execute(
        text(
            "SELECT tablename, indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = 'public' AND tablename <> 'alembic_version' ORDER BY 1, 2"
        )
    ).all()
    storage = conn.execute(
        text(
            "SELECT attrelid::regclass::text, attname, attstorage FROM pg_attribute"
            " JOIN pg_class ON pg_class.oid = attrelid"
            " WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' AND relname <> 'alembic_version'"
            " AND attnum > 0 AND NOT attisdropped ORDER BY 1, 2"
        )
    ).all()
    triggers = conn.execute(
        text(
            "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger"
            " WHERE NOT tgisinternal ORDER BY 1, 2"
        )
    ).all()
    functions = conn.execute(
        text(
            "SELECT proname, pg_get_functiondef(oid) FROM pg_proc"
            " WHERE pronamespace = 'public'::regnamespace ORDER BY 1"
        )
    ).all()
    return {
        "columns": columns,
        "constraints": constraints,
        "indexes": indexes,
        "storage": storage,
        "triggers": triggers,
        "functions": functions,
    }


def test_migrated_schema_equals_the_models_create_all(engine: Engine, pg_database_factory: Callable[[], str]) -> None:
    reference = make_engine(pg_database_factory())
    try:
        Base.metadata.create_all(reference)
        with reference.connect() as ref, engine.connect() as migrated:
            expected, actual = _catalog(ref), _catalog(migrated)
    finally:
        reference.dispose()
    for part in ("columns", "constraints", "indexes", "storage", "triggers", "functions"):
        assert actual[part] == expected[part], part
    assert {name for _t, name, _d in actual["triggers"]} == {
        "feedback_counted_updated",
        "feedback_counted_deleted",
        "feedback_truncated",
    }
    identity = {(t, c) for t, c, *_, is_identity, _gen in actual["columns"] if is_identity == "YES"}
    assert identity == {(t, "id") for t in (SEVEN - {"coils"}) | {"score_passes", "score_resets"}}
    predicates = {name: definition for _t, name, definition in actual["indexes"]}
    assert predicates["uq_models_name_active"].endswith("WHERE ((status)::text = 'active'::text)")
    assert predicates["uq_retrain_runs_model_id_running"].endswith("WHERE ((status)::text = 'running'::text)")
    # the matrix stored out of line uncompressed (0005): readings do not compress, trying cost the server CPU
    assert ("coils", "matrix", "e") in actual["storage"]


def test_downgrading_0005_gives_the_matrix_back_its_default_storage(pg_database_factory: Callable[[], str]) -> None:
    url = pg_database_factory()
    migrate.upgrade(url)
    engine = make_engine(url)
    storage = "SELECT attstorage FROM pg_attribute WHERE attrelid = 'coils'::regclass AND attname = 'matrix'"
    try:
        assert migrate.downgrade(url, "0004") == "0004"
        with engine.connect() as conn:
            assert conn.execute(text(storage)).scalar_one() == "x"
        assert migrate.upgrade(url) == HEAD
        with engine.connect() as conn:
            assert conn.execute(text(storage)).scalar_one() == "e"
    finally:
        engine.dispose()


def _now_defaults(engine: Engine) -> set[str]:
    """The column defaults that fill a time: what 0006 changes."""
    with engine.connect() as conn:
        return set(
            conn.execute(
                text(
                    "SELECT DISTINCT column_default FROM information_schema.columns WHERE table_schema = 'public'"
                    " AND data_type = 'timestamp with time zone' AND column_default IS NOT NULL"
                )
            ).scalars()
        )


def test_0006_dates_rows_by_statement_and_its_downgrade_restores_now(pg_database_factory: Callable[[], str]) -> None:
    url = pg_database_factory()
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        assert _now_defaults(engine) == {"statement_timestamp()"}
        assert migrate.downgrade(url, "0005") == "0005"
        assert _now_defaults(engine) == {"now()"}
        assert migrate.upgrade(url) == HEAD
        assert _now_defaults(engine) == {"statement_timestamp()"}
    finally:
        engine.dispose()


def test_partial_unique_indexes_work(engine: Engine) -> None:
    add_model(engine, "pg-cnn", 1, "active")
    candidate = add_model(engine, "pg-cnn", 2, "candidate")
    add_model(engine, "pg-yolo", 1, "active")
    refused(engine, "INSERT INTO models (name, kind, version, status) VALUES ('pg-cnn', 'cnn', 3, 'active')")
    refused(engine, "UPDATE models SET status = 'active' WHERE id = :m", m=candidate)
    with engine.begin() as conn:  # promotion in one transaction
        conn.execute(text("UPDATE models SET status = 'retired' WHERE name = 'pg-cnn' AND version = 1"))
        conn.execute(text("UPDATE models SET status = 'active' WHERE id = :m"), {"m": candidate})

    run(engine, "INSERT INTO retrain_runs (model_id, worker) VALUES (:m, 'host-a:1')", m=candidate)
    refused(engine, "INSERT INTO retrain_runs (model_id, worker) VALUES (:m, 'host-b:2')", m=candidate)
    run(engine, "UPDATE retrain_runs SET status = 'failed' WHERE model_id = :m", m=candidate)
    run(engine, "INSERT INTO retrain_runs (model_id, worker) VALUES (:m, 'host-b:2')", m=candidate)


def test_checks_and_defaults(engine: Engine) -> None:
    add_coil(engine, "C-checks")
    model = add_model(engine, "pg-checks", 1, "candidate")
    refused(engine, "INSERT INTO coils (coil_id, line, matrix, status) VALUES ('C-x', 'l', '\\x00', 'maybe')")
    refused(engine, "INSERT INTO assessments (coil_id, model_id, label) VALUES ('C-checks', :m, 'YES')", m=model)
    run(engine, "INSERT INTO assessments (coil_id, model_id, label) VALUES ('C-checks', :m, 'ABSTAIN')", m=model)
    refused(engine, "INSERT INTO assessments (coil_id, model_id, label) VALUES ('C-checks', :m, 'OK')", m=model)
    run(engine, "INSERT INTO mperformance (model_id, n_coils, n_correct) VALUES (:m, 0, 0)", m=model)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM coils WHERE coil_id = 'C-checks'")).scalar_one() == "pending"
        assert (
            conn.execute(
                text("SELECT below_threshold FROM mperformance WHERE model_id = :m"), {"m": model}
            ).scalar_one()
            is False
        )


def test_orm_reads_aware_utc_and_jsonb(engine: Engine) -> None:
    Session = session_factory(engine)
    with Session.begin() as session:
        session.add(Coil(coil_id="C-orm", line="galv-1", matrix=b"\x00" * 19_008, product={"coating": "Z275"}))
        session.flush()
        session.add(Feedback(coil_id="C-orm", label="OK"))
    with Session() as session:
        coil = session.get(Coil, "C-orm")
        assert coil is not None and coil.product == {"coating": "Z275"} and len(coil.matrix) == 19_008
        assert coil.received_at.tzinfo == UTC
        assert [f.label for f in coil.feedback] == ["OK"]


def test_downgrade_to_base_leaves_no_tables(pg_database_factory: Callable[[], str]) -> None:
    url = pg_database_factory()
    migrate.upgrade(url)
    assert migrate.downgrade(url, "base") is None
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        with engine.connect() as conn:  # 0008's trigger function too
            assert not _catalog(conn)["functions"]
    finally:
        engine.dispose()
    assert migrate.upgrade(url) == HEAD


def test_concurrent_upgrades_are_serialized(pg_database_factory: Callable[[], str]) -> None:
    """Several pods running `coilguard db upgrade` at once: one migrates, the others find it done."""
    url = pg_database_factory()
    code = "import sys; from services.db import migrate; print(migrate.upgrade(sys.argv[1]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out.strip()) == (0, HEAD), err[-2000:]
    assert migrate.current(url) == HEAD


def test_upgrade_waits_for_a_database_that_is_still_starting(pg_database_factory: Callable[[], str]) -> None:
    """`db upgrade --wait` (docker compose, the Kubernetes Job) rides out refused connections until the
    database answers; without it, the first refusal ends the command with the reason, not a traceback."""
    url = pg_database_factory()
    proxy, via = TcpProxy.in_front_of(url, 5432)
    proxy.cut()  # nothing listens yet: the server is still starting
    env = {"COILGUARD_DATABASE_URL": via}
    at_once = coilguard("db", "upgrade", env=env)
    assert at_once.returncode == 1, at_once.stderr
    assert "cannot reach the database" in at_once.stderr and "Traceback" not in at_once.stderr
    timer = threading.Timer(4.0, proxy.restore)
    timer.start()
    try:
        waited = coilguard("db", "upgrade", "--wait", "2m", env=env)
    finally:
        timer.join()
        proxy.cut()
    assert waited.returncode == 0, waited.stderr
    assert "waiting for the database" in waited.stderr and f"database at revision {HEAD}" in waited.stdout
    assert migrate.current(url) == HEAD


def test_the_announce_pass_reads_only_the_unannounced_decisions(pg_database_factory: Callable[[], str]) -> None:
    """The scheduler looks for stored decisions that never reached the broker every few minutes. Through the
    partial index of 0007 it reads those rows alone; before, it walked ``ix_coils_decided_at`` from the
    oldest coil over the table's whole history to find them."""
    from datetime import datetime, timedelta

    from services.db.repositories import UnannouncedWindow

    url = pg_database_factory()
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        run(
            engine,
            "INSERT INTO coils (coil_id, line, status, decided_at, published_at, matrix) "
            "SELECT 'P-' || i, 'galv-1', 'OK', now() - make_interval(secs => 100000 - i), now(), '\\x00' "
            "FROM generate_series(1, 50000) AS i",
        )
        for coil_id, minutes in (("U-old", 60), ("U-older", 90), ("U-new", 1)):
            run(
                engine,
                "INSERT INTO coils (coil_id, line, status, decided_at, matrix) "
                "VALUES (:c, 'galv-1', 'NOK', now() - make_interval(mins => :m), '\\x00')",
                c=coil_id, m=minutes,
            )  # fmt: skip
        run(engine, "ANALYZE coils")
        query = UnannouncedWindow(datetime.now(UTC) - timedelta(minutes=10), 10_000).query()
        with engine.connect() as conn:
            assert list(conn.execute(query).scalars()) == ["U-older", "U-old"]
            sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
            plan = "\n".join(conn.execute(text(f"EXPLAIN {sql}")).scalars())
        assert "ix_coils_unannounced" in plan, plan
    finally:
        engine.dispose()
