"""Feedback that ModelScore has counted, edited or deleted afterwards, leaves a mark for its next pass.

ModelScore keeps running tallies and adds only the rows no pass has counted (``score_pass`` NULL). An operator
tool that corrects a label with ``UPDATE`` instead of inserting a newer row, a clean-up that deletes feedback,
or a coil deleted with its feedback (``ON DELETE CASCADE``) changes what the tallies stand for without adding a
row, and the scores would stay wrong for the version's whole time in service. A trigger on ``feedback`` notes
such a change in ``score_resets`` (one row is enough: it is not repeated while one is waiting), and the next
pass counts all feedback again (services/db/repositories.py ``SqlScoreStore``). Only a counted row's
``coil_id``, ``label`` or ``created_at`` matter (what "the latest word per coil" reads); the pass's own
stamping of ``score_pass`` fires nothing.

The statements are the schema's, used by migration 0008 and by ``create_all``. A later change to them is a new
migration that drops these and creates its own; editing them here would leave databases migrated earlier as
they were. On SQLite, a later migration that rebuilds ``feedback`` in batch mode drops its triggers and must
create them again.
"""

from __future__ import annotations

RESETS_TABLE = "score_resets"

# Written when no reset is waiting; TG_OP / the trigger's own word says what happened.
_MARK = f"INSERT INTO {RESETS_TABLE} (cause) SELECT {{cause}} WHERE NOT EXISTS (SELECT 1 FROM {RESETS_TABLE})"
_CHANGED = "OLD.coil_id IS DISTINCT FROM NEW.coil_id OR OLD.label IS DISTINCT FROM NEW.label"
_CHANGED += " OR OLD.created_at IS DISTINCT FROM NEW.created_at"
_WATCHED = "coil_id, label, created_at"

_PG_FUNCTION = "coilguard_counted_feedback_changed"
POSTGRESQL_CREATE = (
    # SECURITY DEFINER: an operator role allowed to correct feedback needs no grant on score_resets; the
    # search_path is the migration's, not the caller's.
    f"""CREATE FUNCTION {_PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    {_MARK.format(cause="TG_OP")};
    RETURN NULL;
END $$""",
    f"""CREATE TRIGGER feedback_counted_updated AFTER UPDATE OF {_WATCHED} ON feedback FOR EACH ROW
    WHEN (OLD.score_pass IS NOT NULL AND ({_CHANGED})) EXECUTE FUNCTION {_PG_FUNCTION}()""",
    f"""CREATE TRIGGER feedback_counted_deleted AFTER DELETE ON feedback FOR EACH ROW
    WHEN (OLD.score_pass IS NOT NULL) EXECUTE FUNCTION {_PG_FUNCTION}()""",
    f"""CREATE TRIGGER feedback_truncated AFTER TRUNCATE ON feedback FOR EACH STATEMENT
    EXECUTE FUNCTION {_PG_FUNCTION}()""",
)
POSTGRESQL_DROP = (
    "DROP TRIGGER IF EXISTS feedback_truncated ON feedback",
    "DROP TRIGGER IF EXISTS feedback_counted_deleted ON feedback",
    "DROP TRIGGER IF EXISTS feedback_counted_updated ON feedback",
    f"DROP FUNCTION IF EXISTS {_PG_FUNCTION}()",
)

SQLITE_CREATE = (
    f"""CREATE TRIGGER feedback_counted_updated AFTER UPDATE OF {_WATCHED} ON feedback FOR EACH ROW
    WHEN OLD.score_pass IS NOT NULL AND ({_CHANGED.replace("IS DISTINCT FROM", "IS NOT")})
    BEGIN {_MARK.format(cause="'UPDATE'")}; END""",
    f"""CREATE TRIGGER feedback_counted_deleted AFTER DELETE ON feedback FOR EACH ROW
    WHEN OLD.score_pass IS NOT NULL
    BEGIN {_MARK.format(cause="'DELETE'")}; END""",
)
SQLITE_DROP = (
    "DROP TRIGGER IF EXISTS feedback_counted_deleted",
    "DROP TRIGGER IF EXISTS feedback_counted_updated",
)


def create_statements(dialect: str) -> tuple[str, ...]:
    """The statements that put the triggers in place on ``dialect`` (``postgresql`` or ``sqlite``)."""
    return {"postgresql": POSTGRESQL_CREATE, "sqlite": SQLITE_CREATE}.get(dialect, ())


def drop_statements(dialect: str) -> tuple[str, ...]:
    return {"postgresql": POSTGRESQL_DROP, "sqlite": SQLITE_DROP}.get(dialect, ())
