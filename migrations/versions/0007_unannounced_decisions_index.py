"""An index of the decisions stored but not yet confirmed by the broker, for the scheduler's announce pass
(every ``ANNOUNCE_EVERY``, 5 minutes by default). Without it each pass walked ``ix_coils_decided_at`` from
the oldest coil, checking every row it passed, to find the few unannounced ones: the whole table's history,
every five minutes. Partial, so it holds only those rows (the in-flight ones and the refused ones) and costs
the worker's writes nothing once a decision is marked.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNANNOUNCED = sa.text("published_at IS NULL")


def upgrade() -> None:
    op.create_index(
        op.f("ix_coils_unannounced"), "coils", ["decided_at", "coil_id"],
        postgresql_where=UNANNOUNCED, sqlite_where=UNANNOUNCED,
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index(op.f("ix_coils_unannounced"), table_name="coils")
