"""Store ``coils.matrix`` out of line without trying to compress it (PostgreSQL ``STORAGE EXTERNAL``).

A coil's matrix is 19,008 bytes of float32 readings, over the size at which PostgreSQL moves a value
out of line, and by default it first tries to compress it. Sensor readings do not compress (pglz gave
up on every simulated coil), so each insert spent the attempt for nothing: 0.03–0.05 ms of the
server's 0.22–0.24 ms of CPU per coil in the assess write (docs/benchmarks.md, 2026-12-06). The
column, its type and its bytes are unchanged; SQLite has no such setting, so there this revision does
nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _storage(mode: str) -> None:
    """A catalog change only (no row is rewritten: matrices already stored keep their form), but under an
    ACCESS EXCLUSIVE lock: rather than wait behind a long read of ``coils`` while the assess writes queue
    behind it, give up after a few seconds; the migration Job then fails and is run again."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("SET LOCAL lock_timeout = '5s'")
        op.execute(f"ALTER TABLE coils ALTER COLUMN matrix SET STORAGE {mode}")
        op.execute("SET LOCAL lock_timeout TO DEFAULT")  # later revisions in the same transaction wait as usual


def upgrade() -> None:
    _storage("EXTERNAL")


def downgrade() -> None:
    _storage("EXTENDED")  # PostgreSQL's default for bytea
