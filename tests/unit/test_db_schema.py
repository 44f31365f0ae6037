"""The schema on SQLite: Alembic revision 0001, its constraints, and the engine's per-connection settings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.config import Config
from helpers import migrated_engine
from score_scenario import assessed_coil
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from ml.ensemble import MemberVote
from services.db import migrate
from services.db.engine import make_engine, session_factory
from services.db.models import OPERATIONAL_TABLE_NAMES, TABLE_NAMES, Assessment, Base, Coil, Feedback, Model
from services.db.repositories import SqlCoilStore, UnannouncedWindow

SEVEN = set(TABLE_NAMES)
ALL_TABLES = SEVEN | set(OPERATIONAL_TABLE_NAMES)
HEAD = migrate.head()
ROOT = Path(__file__).resolve().parents[2]
MATRIX = np.zeros((264, 18), dtype="<f4").tobytes()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'coilguard.db'}"


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    with migrated_engine(url) as engine:
        yield engine


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def triggers(engine: Engine) -> dict[str, str]:
    """Each trigger's name and its SQL as SQLite keeps it."""
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")).all())


def run(engine: Engine, sql: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql), params)


def refused(engine: Engine, sql: str, **params: object) -> None:
    with pytest.raises(IntegrityError):
        run(engine, sql, **params)


def add_coil(engine: Engine, coil_id: str = "C-1") -> None:
    run(engine, "INSERT INTO coils (coil_id, line, matrix) VALUES (:c, 'galv-1', :m)", c=coil_id, m=MATRIX)


def add_model(engine: Engine, name: str = "cnn", version: int = 1, status: str = "candidate") -> int:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO models (name, kind, version, status) VALUES (:n, 'cnn', :v, :s)"),
            {"n": name, "v": version, "s": status},
        )
        return conn.execute(
            text("SELECT id FROM models WHERE name = :n AND version = :v"), {"n": name, "v": version}
        ).scalar_one()


def test_upgrade_creates_the_seven_tables_and_the_folder(url: str, tmp_path: Path) -> None:
    assert not (tmp_path / "db").exists()
    assert migrate.upgrade(url) == HEAD
    assert migrate.current(url) == migrate.head() == HEAD
    engine = make_engine(url)
    try:
        assert tables(engine) == ALL_TABLES | {"alembic_version"}
    finally:
        engine.dispose()


def test_plain_sql_feedback_insert_works(engine: Engine) -> None:
    add_coil(engine, "C-2026-000123")
    run(engine, "INSERT INTO feedback (coil_id, label, operator) VALUES ('C-2026-000123', 'NOK', 'anna')")
    run(engine, "INSERT INTO feedback (coil_id, label) VALUES ('C-2026-000123', 'OK')")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, coil_id, label, operator, created_at FROM feedback ORDER BY id")).all()
    assert [(r.id, r.label, r.operator) for r in rows] == [(1, "NOK", "anna"), (2, "OK", None)]
    assert all(r.created_at for r in rows)


@pytest.mark.parametrize("label", ["ok", "MAYBE", "ABSTAIN", ""])
def test_feedback_label_other_than_ok_nok_is_refused(engine: Engine, label: str) -> None:
    add_coil(engine)
    refused(engine, "INSERT INTO feedback (coil_id, label, operator) VALUES ('C-1', :l, 'anna')", l=label)
    refused(engine, "INSERT INTO feedback (coil_id, label) VALUES ('C-1', NULL)")


def test_feedback_for_an_unknown_coil_is_refused(engine: Engine) -> None:
    refused(engine, "INSERT INTO feedback (coil_id, label, operator) VALUES ('C-nope', 'OK', 'anna')")


def test_foreign_keys_are_on_for_every_connection(engine: Engine) -> None:
    for _ in range(3):
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_check_constraints_on_statuses_and_labels(engine: Engine) -> None:
    refused(engine, "INSERT INTO coils (coil_id, line, matrix, status) VALUES ('C-x', 'l', x'00', 'maybe')")
    refused(engine, "INSERT INTO models (name, kind, version, status) VALUES ('m', 'k', 1, 'champion')")
    add_coil(engine)
    model = add_model(engine)
    refused(engine, "INSERT INTO assessments (coil_id, model_id, label) VALUES ('C-1', :m, 'YES')", m=model)
    refused(engine, "INSERT INTO retrain_runs (model_id, status) VALUES (:m, 'paused')", m=model)
    # An abstention is recorded with no probability.
    run(engine, "INSERT INTO assessments (coil_id, model_id, label) VALUES ('C-1', :m, 'ABSTAIN')", m=model)
    # One vote per model per coil.
    refused(engine, "INSERT INTO assessments (coil_id, model_id, label) VALUES ('C-1', :m, 'OK')", m=model)


def test_defaults_fill_status_and_timestamps(engine: Engine) -> None:
    add_coil(engine)
    model = add_model(engine)
    run(engine, "INSERT INTO retrain_runs (model_id) VALUES (:m)", m=model)
    run(engine, "INSERT INTO mperformance (model_id, n_coils, n_correct) VALUES (:m, 0, 0)", m=model)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM coils")).scalar_one() == "pending"
        assert conn.execute(text("SELECT status FROM models")).scalar_one() == "candidate"
        assert conn.execute(text("SELECT status FROM retrain_runs")).scalar_one() == "running"
        assert conn.execute(text("SELECT below_threshold FROM mperformance")).scalar_one() == 0


def test_at_most_one_active_version_per_name(engine: Engine) -> None:
    add_model(engine, "cnn", 1, "active")
    add_model(engine, "cnn", 2, "candidate")
    add_model(engine, "siamese", 1, "active")  # another name may have its own active version
    refused(engine, "INSERT INTO models (name, kind, version, status) VALUES ('cnn', 'cnn', 3, 'active')")
    refused(engine, "UPDATE models SET status = 'active' WHERE name = 'cnn' AND version = 2")
    refused(engine, "INSERT INTO models (name, kind, version) VALUES ('cnn', 'cnn', 1)")  # (name, version)
    # Promotion: retire the champion and activate the challenger in one transaction.
    with engine.begin() as conn:
        conn.execute(text("UPDATE models SET status = 'retired' WHERE name = 'cnn' AND version = 1"))
        conn.execute(text("UPDATE models SET status = 'active' WHERE name = 'cnn' AND version = 2"))


def test_one_running_retrain_per_model(engine: Engine) -> None:
    model, other = add_model(engine, "cnn", 1, "active"), add_model(engine, "yolo", 1, "active")
    run(engine, "INSERT INTO retrain_runs (model_id, status, worker) VALUES (:m, 'running', 'a:1')", m=model)
    run(engine, "INSERT INTO retrain_runs (model_id, status) VALUES (:m, 'running')", m=other)
    refused(engine, "INSERT INTO retrain_runs (model_id, status, worker) VALUES (:m, 'running', 'b:2')", m=model)
    run(engine, "UPDATE retrain_runs SET status = 'rejected' WHERE model_id = :m", m=model)
    run(engine, "INSERT INTO retrain_runs (model_id, status, worker) VALUES (:m, 'running', 'b:2')", m=model)


def test_deleting_a_coil_takes_its_votes_and_feedback(engine: Engine) -> None:
    add_coil(engine)
    model = add_model(engine)
    run(engine, "INSERT INTO assessments (coil_id, model_id, label, p_nok) VALUES ('C-1', :m, 'OK', 0.1)", m=model)
    run(engine, "INSERT INTO feedback (coil_id, label) VALUES ('C-1', 'OK')")
    refused(engine, "DELETE FROM models WHERE id = :m", m=model)  # a model with votes stays
    run(engine, "DELETE FROM coils WHERE coil_id = 'C-1'")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM assessments")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM feedback")).scalar_one() == 0


def test_orm_round_trip_keeps_bytes_json_and_utc(engine: Engine) -> None:
    Session = session_factory(engine)
    produced = datetime(2026, 11, 23, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    matrix = np.arange(264 * 18, dtype="<f4").reshape(264, 18)
    with Session.begin() as session:
        model = Model(name="cnn", kind="cnn", version=1, status="active", metrics={"f1": 0.9})
        coil = Coil(
            coil_id="C-1",
            line="galv-1",
            produced_at=produced,
            matrix=matrix.tobytes(),
            product={"coating": "Z275", "width_mm": 1250},
        )
        session.add_all([model, coil])
        session.flush()
        session.add(Assessment(coil_id="C-1", model_id=model.id, label="NOK", p_nok=0.8, confidence=0.6))
        session.add(Feedback(coil_id="C-1", label="NOK", operator="anna"))
    with Session() as session:
        coil = session.get(Coil, "C-1")
        assert coil is not None
        assert len(coil.matrix) == 19_008
        assert np.array_equal(np.frombuffer(coil.matrix, dtype="<f4").reshape(264, 18), matrix)
        assert coil.product == {"coating": "Z275", "width_mm": 1250}
        assert coil.status == "pending"
        assert coil.produced_at == produced and coil.produced_at.tzinfo == UTC
        assert coil.received_at.tzinfo == UTC
        assert abs(coil.received_at - datetime.now(UTC)) < timedelta(minutes=5)
        assert [a.label for a in coil.assessments] == ["NOK"]
        assert coil.assessments[0].model.metrics == {"f1": 0.9}
        assert [f.operator for f in coil.feedback] == ["anna"]
        assert session.scalars(select(Feedback.id)).all() == [1]


def test_a_coil_without_product_has_sql_null_not_json_null(engine: Engine) -> None:
    """DESIGN §3: product is optional; an operator's `WHERE product IS NULL` must find such coils."""
    at = datetime.now(UTC)
    SqlCoilStore(engine).save_assessed(
        [assessed_coil("C-none", [MemberVote("cnn", 1, "OK", 0.1, 0.8)], at)], {("cnn", 1): add_model(engine)}
    )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM coils WHERE product IS NULL")).scalar_one() == 1


def test_downgrade_removes_everything_and_upgrade_works_again(engine: Engine, url: str) -> None:
    add_coil(engine)
    engine.dispose()
    assert migrate.downgrade(url, "base") is None
    assert migrate.current(url) is None
    assert tables(engine) <= {"alembic_version"}
    assert migrate.downgrade(url) is None  # already at base: nothing to do
    assert migrate.upgrade(url) == HEAD
    assert tables(engine) == ALL_TABLES | {"alembic_version"}
    add_coil(engine)
    run(engine, "INSERT INTO feedback (coil_id, label, operator) VALUES ('C-1', 'NOK', 'anna')")


def test_default_downgrade_is_one_step(engine: Engine, url: str) -> None:
    engine.dispose()
    coil_indexes = {"ix_coils_received_at_coil_id", "ix_coils_decided_at"}
    assert coil_indexes | {"ix_coils_unannounced"} <= {i["name"] for i in inspect(engine).get_indexes("coils")}
    assert set(triggers(engine)) == {"feedback_counted_updated", "feedback_counted_deleted"}
    assert migrate.downgrade(url) == "0007"  # 0008 (counted feedback edited: the triggers, score_resets) undone
    assert not triggers(engine)
    before_0008 = ALL_TABLES - {"score_resets"}
    assert tables(engine) == before_0008 | {"alembic_version"}
    assert migrate.downgrade(url) == "0006"  # 0007 (the unannounced decisions' index) undone
    assert "ix_coils_unannounced" not in {i["name"] for i in inspect(engine).get_indexes("coils")}
    assert migrate.downgrade(url) == "0005"  # 0006 (statement-time defaults) undone, the tables kept
    assert tables(engine) == before_0008 | {"alembic_version"}
    assert migrate.downgrade(url) == "0004"  # 0005 (the matrix's storage, PostgreSQL only) undone
    assert tables(engine) == before_0008 | {"alembic_version"}
    assert migrate.downgrade(url) == "0003"  # 0004 (the API's coil indexes) undone, the tables kept
    assert tables(engine) == before_0008 | {"alembic_version"}
    assert not coil_indexes & {i["name"] for i in inspect(engine).get_indexes("coils")}
    assert migrate.downgrade(url) == "0002"  # 0003 (ModelScore's tallies) undone
    assert tables(engine) == SEVEN | {"workers", "alembic_version"}
    assert "score_pass" not in {c["name"] for c in inspect(engine).get_columns("feedback")}
    assert migrate.downgrade(url) == "0001"  # 0002 (worker heartbeats) undone, the seven tables kept
    assert tables(engine) == SEVEN | {"alembic_version"}
    assert migrate.downgrade(url) is None
    assert tables(engine) <= {"alembic_version"}


def test_models_match_the_migration_on_sqlite(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
        assert compare_metadata(context, Base.metadata) == []
    migrate.check(str(engine.url))  # through env.py, as `alembic revision --autogenerate` compares


def _schema(engine: Engine) -> dict[str, dict[str, Any]]:
    """What SQLite says about every table, beyond what autogenerate compares there (defaults, CHECKs, index
    predicates): a table rebuilt by batch mode must come back whole."""
    found = inspect(engine)

    def options(index: dict) -> dict[str, str]:
        return {k: str(v) for k, v in index.get("dialect_options", {}).items()}

    return {
        table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c["default"]) for c in found.get_columns(table)],
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), i["unique"], str(options(i))) for i in found.get_indexes(table)
            ),
            "checks": sorted((c["name"], c["sqltext"]) for c in found.get_check_constraints(table)),
            "foreign_keys": sorted(
                (f["name"], tuple(f["constrained_columns"]), f["referred_table"], str(f["options"]))
                for f in found.get_foreign_keys(table)
            ),
            "unique": sorted((u["name"], tuple(u["column_names"])) for u in found.get_unique_constraints(table)),
            "primary_key": found.get_pk_constraint(table),
        }
        for table in sorted(found.get_table_names())
        if table != "alembic_version"
    }


def test_migrated_sqlite_schema_equals_the_models_create_all(engine: Engine, tmp_path: Path) -> None:
    reference = make_engine(f"sqlite:///{tmp_path / 'reference.db'}")
    try:
        Base.metadata.create_all(reference)
        Base.metadata.create_all(reference)  # the tables there already: nothing to create, the triggers included
        expected, actual = _schema(reference), _schema(engine)
        assert triggers(engine) == triggers(reference) and triggers(engine)
    finally:
        reference.dispose()
    assert actual == expected
    filled = {default for t in actual.values() for name, _, _, default in t["columns"] if name.endswith("ed_at")}
    assert filled == {None, "strftime('%Y-%m-%d %H:%M:%f000', 'now')"}  # the time of the statement, SQLAlchemy's form


def test_0006_lengthens_current_timestamp_values_and_its_downgrade_restores_the_default(url: str) -> None:
    """Coils already inserted by plain SQL under CURRENT_TIMESTAMP get SQLAlchemy's form of their instant."""
    migrate.upgrade(url, "0005")
    engine = make_engine(url)
    received = "SELECT received_at FROM coils WHERE coil_id = :c"
    try:
        add_coil(engine, "C-old")
        with engine.connect() as conn:
            short = conn.execute(text(received), {"c": "C-old"}).scalar_one()
        run(engine, "INSERT INTO coils (coil_id, line, matrix, received_at) VALUES ('C-given', 'l', x'00', 'soon')")
        assert len(short) == 19
        assert migrate.upgrade(url) == HEAD
        with engine.connect() as conn:
            assert conn.execute(text(received), {"c": "C-old"}).scalar_one() == short + ".000000"
            assert conn.execute(text(received), {"c": "C-given"}).scalar_one() == "soon"  # not ours to read
        assert migrate.downgrade(url, "0005") == "0005"
        add_coil(engine, "C-after")
        with engine.connect() as conn:
            assert len(conn.execute(text(received), {"c": "C-after"}).scalar_one()) == 19  # CURRENT_TIMESTAMP again
    finally:
        engine.dispose()


def test_a_failing_sqlite_migration_leaves_the_database_as_it_was(url: str, tmp_path: Path) -> None:
    """env.py runs a SQLite migration in one transaction, DDL included."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.migrations_dir(), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_broken.py").write_text(
        '"""A revision that fails half way."""\n'
        "import sqlalchemy as sa\n"
        "from alembic import op\n\n"
        'revision = "9999"\n'
        f'down_revision = "{HEAD}"\n'
        "branch_labels = depends_on = None\n\n\n"
        "def upgrade():\n"
        '    op.create_table("scratch", sa.Column("id", sa.Integer, primary_key=True))\n'
        '    with op.batch_alter_table("coils") as batch:\n'
        '        batch.add_column(sa.Column("note", sa.Text))\n'
        "    op.execute(\"INSERT INTO feedback (coil_id, label) VALUES ('C-1', 'OK')\")\n"
        '    op.execute("SELECT * FROM no_such_table")\n\n\n'
        "def downgrade():\n"
        "    pass\n"
    )
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        add_coil(engine)
        run(engine, "INSERT INTO feedback (coil_id, label) VALUES ('C-1', 'NOK')")
        cfg = Config()
        cfg.set_main_option("script_location", str(scripts))
        cfg.attributes["url"] = url
        with pytest.raises(Exception, match="no_such_table"):
            command.upgrade(cfg, "head")
        assert migrate.current(url) == HEAD
        assert tables(engine) == ALL_TABLES | {"alembic_version"}
        assert "note" not in {c["name"] for c in inspect(engine).get_columns("coils")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT label FROM feedback")).scalars().all() == ["NOK"]
    finally:
        engine.dispose()


def upgrade_at_once(url: str, n: int) -> list[tuple[int, str, str]]:
    """Run ``migrate.upgrade(url)`` in ``n`` processes started together (like pods starting at once)."""
    code = "import sys; from services.db import migrate; print(migrate.upgrade(sys.argv[1]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((proc.returncode, out.strip(), err[-2000:]))
    return results


def test_concurrent_upgrades_of_one_sqlite_file_all_succeed(url: str) -> None:
    for returncode, out, err in upgrade_at_once(url, 4):
        assert (returncode, out) == (0, HEAD), err
    assert migrate.current(url) == HEAD


def test_make_engine_in_memory_and_session_factory() -> None:
    engine = make_engine("sqlite://")
    try:
        Base.metadata.create_all(engine)
        with session_factory(engine).begin() as session:
            session.add(Coil(coil_id="C-1", line="galv-1", matrix=MATRIX))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM coils")).scalar_one() == 1
    finally:
        engine.dispose()


def test_unannounced_decisions_page_by_their_key_on_sqlite(engine: Engine) -> None:
    """The announce pass pages by (decided_at, coil_id), so that a refused page is not read again within a pass;
    on SQLite the key is compared as the text SQLAlchemy writes, the same instant twice included."""
    store = SqlCoilStore(engine)
    now = datetime.now(UTC)
    same = now - timedelta(minutes=30)
    with engine.begin() as conn:
        conn.execute(
            Coil.__table__.insert(),
            [
                dict(coil_id=c, line=line, status="OK", decided_at=at, matrix=b"\x00", published_at=published)
                for c, line, at, published in (
                    ("K-3", "galv-1", same, None), ("K-2", "galv-1", same, None),
                    ("K-1", "galv-2", now - timedelta(hours=2), None),
                    ("K-sent", "galv-1", same, now), ("K-new", "galv-1", now - timedelta(minutes=1), None),
                )
            ],
        )  # fmt: skip
    before = now - timedelta(minutes=10)
    first = store.unannounced(UnannouncedWindow(before, 2))
    assert [c for c, _ in first] == ["K-1", "K-2"]
    key = (first[-1][1], first[-1][0])
    assert [c for c, _ in store.unannounced(UnannouncedWindow(before, 2, after=key))] == ["K-3"]
    skipping = UnannouncedWindow(before, 5, skip_lines=frozenset({"galv-2"}))
    assert [c for c, _ in store.unannounced(skipping)] == ["K-2", "K-3"]
    recent = UnannouncedWindow(before, 5, since=now - timedelta(hours=1))
    assert [c for c, _ in store.unannounced(recent)] == ["K-2", "K-3"]
    assert [c for c, _ in store.unannounced(UnannouncedWindow(before, 5, line="galv-2"))] == ["K-1"]
    assert store.count_unannounced(before, now - timedelta(hours=1)) == (3, 1)  # K-1 past the age limit
