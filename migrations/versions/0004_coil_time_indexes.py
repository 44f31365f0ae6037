"""Indexes for the API's unfiltered reads of coils: ``GET /coils`` with no filter or only ``since``
(newest first by ``received_at``, then ``coil_id``) and ``/status`` (the last decision, the count of
the last 24 h by ``decided_at``) scanned the whole table; the indexes of 0001 all lead with
``line`` or ``status``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_coils_received_at_coil_id"), "coils", ["received_at", "coil_id"])
    op.create_index(op.f("ix_coils_decided_at"), "coils", ["decided_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_coils_decided_at"), table_name="coils")
    op.drop_index(op.f("ix_coils_received_at_coil_id"), table_name="coils")
