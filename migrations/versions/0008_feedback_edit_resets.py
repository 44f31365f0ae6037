"""ModelScore notices counted feedback edited or deleted by hand, and counts all feedback again.

The running tallies (0003) see only rows added. A label corrected with ``UPDATE``, feedback deleted, or a coil
deleted with its feedback left the scores counting what is no longer there, until someone ran ``coilguard
score --recount``. Triggers on ``feedback`` now write a row to ``score_resets`` when a counted row's coil, label
or date changes or the row goes, and the next pass recounts (services/db/feedback_edits.py). Feedback edited
before this upgrade is not noticed: the first pass after it counts as before.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from services.db.feedback_edits import RESETS_TABLE, create_statements, drop_statements

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
NOW = {"postgresql": "statement_timestamp()", "sqlite": "strftime('%Y-%m-%d %H:%M:%f000', 'now')"}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        RESETS_TABLE,
        sa.Column("id", BIG_ID, sa.Identity(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text(NOW[dialect]), nullable=False),
        sa.Column("cause", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{RESETS_TABLE}")),
    )
    if dialect == "postgresql":  # CREATE TRIGGER waits for the feedback writes under way: not for long
        op.execute("SET LOCAL lock_timeout = '5s'")
    for statement in create_statements(dialect):
        op.execute(statement)
    if dialect == "postgresql":
        op.execute("SET LOCAL lock_timeout TO DEFAULT")


def downgrade() -> None:
    for statement in drop_statements(op.get_bind().dialect.name):
        op.execute(statement)
    op.drop_table(RESETS_TABLE)
