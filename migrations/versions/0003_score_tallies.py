"""ModelScore counts incrementally: feedback rows remember the pass that counted them, and every
model version keeps running tallies, so a pass costs the new feedback and not the whole table.

Existing feedback rows start uncounted; the first pass after the upgrade counts them all once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "score_passes",
        sa.Column("id", BIG_ID, sa.Identity(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("n_feedback", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_score_passes")),
    )
    op.create_table(
        "score_tallies",
        sa.Column("model_id", BIG_ID, nullable=False),
        sa.Column("n_coils", sa.BigInteger(), nullable=False),
        sa.Column("n_correct", sa.BigInteger(), nullable=False),
        sa.Column("tp", sa.BigInteger(), nullable=False),
        sa.Column("predicted_nok", sa.BigInteger(), nullable=False),
        sa.Column("actual_nok", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_score_tallies_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_score_tallies")),
    )
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("score_pass", BIG_ID, nullable=True))
    op.create_index(op.f("ix_feedback_score_pass"), "feedback", ["score_pass"])


def downgrade() -> None:
    op.drop_index(op.f("ix_feedback_score_pass"), table_name="feedback")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("score_pass")
    op.drop_table("score_tallies")
    op.drop_table("score_passes")
