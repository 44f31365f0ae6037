"""The seven tables of DESIGN §4.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Written by hand to read as the schema; ``tests/integration/test_migrations.py`` proves that Alembic
autogenerate finds no difference between it and ``services/db/models.py`` on PostgreSQL. Constraint
names are those of the naming convention of ``services.db.models.Base``, spelled out and marked final
with ``op.f()`` (Alembic would otherwise put the ``ck_<table>_`` prefix on a CHECK name twice).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT identity on PostgreSQL; INTEGER PRIMARY KEY (the rowid) on SQLite.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
COIL_ID = sa.String(64)


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def id_column() -> sa.Column:
    return sa.Column("id", BIG_ID, sa.Identity(), primary_key=True)


def now_column(name: str) -> sa.Column:
    return sa.Column(name, timestamp(), server_default=sa.func.now(), nullable=False)


def one_of(column: str, *values: str) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "coils",
        sa.Column("coil_id", COIL_ID, nullable=False),
        sa.Column("line", sa.String(64), nullable=False),
        sa.Column("produced_at", timestamp(), nullable=True),
        now_column("received_at"),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("p_nok", sa.Float(), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("decided_at", timestamp(), nullable=True),
        sa.Column("matrix", sa.LargeBinary(), nullable=False),
        sa.Column("product", JSON, nullable=True),
        sa.Column("published_at", timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("coil_id", name=op.f("pk_coils")),
        sa.CheckConstraint(one_of("status", "pending", "OK", "NOK"), name=op.f("ck_coils_status")),
    )
    op.create_index(op.f("ix_coils_line_received_at"), "coils", ["line", "received_at"])
    op.create_index(op.f("ix_coils_status_received_at"), "coils", ["status", "received_at"])

    op.create_table(
        "models",
        id_column(),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), server_default="candidate", nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("metrics", JSON, nullable=True),
        now_column("created_at"),
        sa.Column("promoted_at", timestamp(), nullable=True),
        sa.Column("retired_at", timestamp(), nullable=True),
        sa.Column("parent_id", BIG_ID, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.CheckConstraint(one_of("status", "candidate", "active", "retired", "failed"), name=op.f("ck_models_status")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_models_name_version")),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["models.id"], name=op.f("fk_models_parent_id_models"), ondelete="SET NULL"
        ),
    )
    # At most one active version per name.
    op.create_index(
        op.f("uq_models_name_active"),
        "models",
        ["name"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )

    op.create_table(
        "assessments",
        id_column(),
        sa.Column("coil_id", COIL_ID, nullable=False),
        sa.Column("model_id", BIG_ID, nullable=False),
        sa.Column("label", sa.String(8), nullable=False),
        sa.Column("p_nok", sa.Float(), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        now_column("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assessments")),
        sa.CheckConstraint(one_of("label", "OK", "NOK", "ABSTAIN"), name=op.f("ck_assessments_label")),
        sa.UniqueConstraint("coil_id", "model_id", name=op.f("uq_assessments_coil_id_model_id")),
        sa.ForeignKeyConstraint(
            ["coil_id"], ["coils.coil_id"], name=op.f("fk_assessments_coil_id_coils"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_assessments_model_id_models")),
    )
    op.create_index(op.f("ix_assessments_model_id"), "assessments", ["model_id"])

    op.create_table(
        "feedback",
        id_column(),
        sa.Column("coil_id", COIL_ID, nullable=False),
        sa.Column("label", sa.String(8), nullable=False),
        sa.Column("operator", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        now_column("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
        sa.CheckConstraint(one_of("label", "OK", "NOK"), name=op.f("ck_feedback_label")),
        sa.ForeignKeyConstraint(
            ["coil_id"], ["coils.coil_id"], name=op.f("fk_feedback_coil_id_coils"), ondelete="CASCADE"
        ),
    )
    # The latest row per coil wins.
    op.create_index(op.f("ix_feedback_coil_id_created_at_id"), "feedback", ["coil_id", "created_at", "id"])

    op.create_table(
        "mperformance",
        id_column(),
        sa.Column("model_id", BIG_ID, nullable=False),
        now_column("computed_at"),
        sa.Column("window_start", timestamp(), nullable=True),
        sa.Column("window_end", timestamp(), nullable=True),
        sa.Column("n_coils", sa.Integer(), nullable=False),
        sa.Column("n_correct", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("precision_nok", sa.Float(), nullable=True),
        sa.Column("recall_nok", sa.Float(), nullable=True),
        sa.Column("below_threshold", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mperformance")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_mperformance_model_id_models")),
    )
    op.create_index(op.f("ix_mperformance_model_id_computed_at"), "mperformance", ["model_id", "computed_at"])

    op.create_table(
        "retrain_runs",
        id_column(),
        sa.Column("model_id", BIG_ID, nullable=False),
        sa.Column("challenger_id", BIG_ID, nullable=True),
        now_column("started_at"),
        sa.Column("finished_at", timestamp(), nullable=True),
        sa.Column("status", sa.String(16), server_default="running", nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("metrics", JSON, nullable=True),
        sa.Column("device", sa.Text(), nullable=True),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrain_runs")),
        sa.CheckConstraint(
            one_of("status", "running", "promoted", "rejected", "failed"), name=op.f("ck_retrain_runs_status")
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_retrain_runs_model_id_models")),
        sa.ForeignKeyConstraint(
            ["challenger_id"],
            ["models.id"],
            name=op.f("fk_retrain_runs_challenger_id_models"),
            ondelete="SET NULL",
        ),
    )
    op.create_index(op.f("ix_retrain_runs_model_id_started_at"), "retrain_runs", ["model_id", "started_at"])
    # Two schedulers cannot run the same model's retrain at once.
    op.create_index(
        op.f("uq_retrain_runs_model_id_running"),
        "retrain_runs",
        ["model_id"],
        unique=True,
        postgresql_where=sa.text("status = 'running'"),
        sqlite_where=sa.text("status = 'running'"),
    )

    op.create_table(
        "drift_reports",
        id_column(),
        now_column("created_at"),
        sa.Column("window_start", timestamp(), nullable=False),
        sa.Column("window_end", timestamp(), nullable=False),
        sa.Column("dataset_drift", sa.Boolean(), nullable=False),
        sa.Column("share_drifted", sa.Float(), nullable=True),
        sa.Column("report_uri", sa.Text(), nullable=True),
        sa.Column("summary", JSON, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_reports")),
    )
    op.create_index(op.f("ix_drift_reports_created_at"), "drift_reports", ["created_at"])


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints with it; referencing tables go first.
    for table in ("drift_reports", "retrain_runs", "mperformance", "feedback", "assessments", "models", "coils"):
        op.drop_table(table)
