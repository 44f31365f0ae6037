"""``coilguard db upgrade|downgrade`` as an operator runs it, on a SQLite file."""

from __future__ import annotations

from pathlib import Path

from alembic.script import ScriptDirectory
from cli_runner import coilguard

from services.db import migrate


def one_below(revision: str) -> str | None:
    down = ScriptDirectory.from_config(migrate.alembic_config("")).get_revision(revision).down_revision
    assert down is None or isinstance(down, str)
    return down


def test_a_bare_downgrade_undoes_one_revision(tmp_path: Path) -> None:
    """DESIGN §5 lists `db downgrade` with no argument: one step, as migrate.downgrade does by default."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    env = {"COILGUARD_DATABASE_URL": url}
    up = coilguard("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    head = migrate.head()
    assert head is not None and migrate.current(url) == head
    bare = coilguard("db", "downgrade", env=env)
    assert bare.returncode == 0, bare.stderr
    assert migrate.current(url) == one_below(head)
    assert f"database at revision {one_below(head)}" in bare.stdout
    step = coilguard("db", "downgrade", "-1", env=env)  # a revision that looks like an option still works
    assert step.returncode == 0, step.stderr
    assert migrate.current(url) == one_below(str(one_below(head)))
    assert coilguard("db", "downgrade", str(migrate.first()), env=env).returncode == 0
    refused = coilguard("db", "downgrade", env=env)  # one step below the first revision drops every table
    assert refused.returncode != 0 and "downgrade base" in refused.stderr, refused.stderr
    assert migrate.current(url) == migrate.first()
    down = coilguard("db", "downgrade", "base", env=env)
    assert down.returncode == 0, down.stderr
    assert migrate.current(url) is None and "database at revision base" in down.stdout


def test_no_downgrade_but_base_goes_below_the_first_revision(tmp_path: Path) -> None:
    """Only a bare one step was refused at the first revision: `db downgrade -8` from the head (or `-2` one
    revision up) went to base and dropped every table, exiting 0."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    env = {"COILGUARD_DATABASE_URL": url}
    assert coilguard("db", "upgrade", env=env).returncode == 0
    head, first = str(migrate.head()), str(migrate.first())
    depth = len(list(ScriptDirectory.from_config(migrate.alembic_config("")).walk_revisions()))  # head-(depth-1): first
    for revision in (f"-{depth}", f"{head}-{depth}", f"{first}-1", f"head-{depth}"):
        refused = coilguard("db", "downgrade", revision, env=env)
        assert refused.returncode != 0 and "drops every table" in refused.stderr, (revision, refused.stderr)
        assert migrate.current(url) == head
    beyond = coilguard("db", "downgrade", f"-{depth + 5}", env=env)  # more steps than there are: Alembic's refusal
    assert beyond.returncode != 0 and "didn't produce" in beyond.stderr and migrate.current(url) == head
    for unknown in ("9999", "@-1"):
        refused = coilguard("db", "downgrade", unknown, env=env)
        assert refused.returncode != 0 and "Can't locate revision" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and migrate.current(url) == head
    scripts = ScriptDirectory.from_config(migrate.alembic_config(""))
    second = next(r.revision for r in scripts.walk_revisions() if r.down_revision == first)
    plus = coilguard("db", "downgrade", "base+2", env=env)  # the forms Alembic takes are let through
    assert plus.returncode == 0, plus.stderr
    assert migrate.current(url) == second
    to_first = coilguard("db", "downgrade", "-1", env=env)  # as far as the first revision: allowed
    assert to_first.returncode == 0, to_first.stderr
    assert migrate.current(url) == first
