"""Timestamps the database fills itself: the time of the statement, written as SQLAlchemy writes it.

PostgreSQL: ``now()`` is the start of the transaction. An operator tool with autocommit off that read
first and inserted later dated its feedback before a row another tool had committed in between, so the
older word won "the latest row for a coil" (DESIGN §4). The defaults become ``statement_timestamp()``;
a catalog change only, no row is rewritten.

SQLite: ``CURRENT_TIMESTAMP`` writes ``2026-12-06 23:20:00``, SQLAlchemy binds ``2026-12-06
23:20:00.000000``, and SQLite compares the two as text: a row inserted by plain SQL sorted before its own
instant, so ``GET /coils`` paging returned it again and again and ``since`` left it out. The defaults
become ``strftime('%Y-%m-%d %H:%M:%f000', 'now')`` (SQLAlchemy's form, to the millisecond SQLite keeps),
which means rebuilding the tables (batch mode; on a large embedded database this takes a while), and
the values already written in the short form are rewritten in the long one (the same instant).

Downgrade puts ``now()`` / ``CURRENT_TIMESTAMP`` back; the rewritten SQLite values stay, as SQLAlchemy
would have written them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every column that 0001-0003 created with ``server_default=now()`` (``_now()`` in services/db/models.py).
NOW_COLUMNS: dict[str, tuple[str, ...]] = {
    "coils": ("received_at",),
    "models": ("created_at",),
    "assessments": ("created_at",),
    "feedback": ("created_at",),
    "mperformance": ("computed_at",),
    "retrain_runs": ("started_at",),
    "drift_reports": ("created_at",),
    "workers": ("started_at", "seen_at"),
    "score_passes": ("started_at",),
    "score_tallies": ("updated_at",),
}

PG_NOW = "statement_timestamp()"
PG_OLD_NOW = "now()"
SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"
SQLITE_OLD_NOW = "CURRENT_TIMESTAMP"
# Exactly CURRENT_TIMESTAMP's form (GLOB matches the whole text): nothing else is touched.
SHORT_FORM = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9]"


def _set_postgresql_defaults(expression: str) -> None:
    """A catalog change, but under an ACCESS EXCLUSIVE lock per table: rather than wait behind a long read while
    the assess writes queue behind it, give up after a few seconds (the migration Job fails and runs again)."""
    op.execute("SET LOCAL lock_timeout = '5s'")
    for table, columns in NOW_COLUMNS.items():
        for column in columns:
            op.alter_column(table, column, server_default=sa.text(expression), existing_nullable=False)
    op.execute("SET LOCAL lock_timeout TO DEFAULT")


def _set_sqlite_defaults(expression: str) -> None:
    """SQLite cannot change a column's default in place: batch mode rebuilds each table with its rows."""
    for table, columns in NOW_COLUMNS.items():
        with op.batch_alter_table(table, recreate="always") as batch:
            for column in columns:
                batch.alter_column(
                    column,
                    server_default=sa.text(expression),
                    existing_type=sa.DateTime(timezone=True),
                    existing_nullable=False,
                )


def _lengthen_sqlite_values() -> None:
    """Rows already filled by ``CURRENT_TIMESTAMP`` get SQLAlchemy's form of the same instant, so they compare
    right with values bound by the application."""
    for table, columns in NOW_COLUMNS.items():
        for column in columns:
            op.execute(
                f"UPDATE {table} SET {column} = strftime('%Y-%m-%d %H:%M:%f000', {column})"
                f" WHERE {column} GLOB '{SHORT_FORM}'"
            )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _set_sqlite_defaults(SQLITE_NOW)
        _lengthen_sqlite_values()
    else:
        _set_postgresql_defaults(PG_NOW)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _set_sqlite_defaults(SQLITE_OLD_NOW)
    else:
        _set_postgresql_defaults(PG_OLD_NOW)
