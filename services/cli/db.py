"""``coilguard db upgrade|downgrade``: schema migrations."""

from __future__ import annotations

from datetime import timedelta

import click

from services.cli.base import DURATION, AppContext, cli, pass_ctx


@cli.group()
def db() -> None:
    """Database schema migrations (Alembic)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.option(
    "--wait",
    type=DURATION,
    help="Keep trying to reach the database for this long (e.g. 2m) before giving up: for a migration started "
    "beside a database that is still starting (docker compose, the Kubernetes Job).",
)
@pass_ctx
def db_upgrade(ctx: AppContext, revision: str, wait: timedelta | None) -> None:
    """Migrate the database up to REVISION (default: the newest)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from services.db.migrate import current, upgrade, wait_until_reachable

    url = ctx.settings.database_url
    where = make_url(url).render_as_string(hide_password=True)
    try:  # without --wait: one try, and a refusal is one line with the reason, not a traceback
        wait_until_reachable(
            url,
            wait.total_seconds() if wait is not None else 0.0,
            on_wait=lambda why: click.echo(f"waiting for the database {where}: {why}", err=True),
        )
    except OperationalError as exc:
        within = f" within {wait}" if wait is not None else ""
        raise click.ClickException(f"cannot reach the database {where}{within}: {exc.orig or exc}") from None
    upgrade(url, revision)
    click.echo(f"database at revision {current(url)}")


@db.command("downgrade", context_settings={"ignore_unknown_options": True})  # so that `-1` is a revision
@click.argument("revision", default="-1")
@pass_ctx
def db_downgrade(ctx: AppContext, revision: str) -> None:
    """Migrate the database down to REVISION: -1 for one step (the default), a revision id, or base (drops every table).

    A bare `db downgrade` (DESIGN §5) undoes the newest revision only, as services.db.migrate.downgrade does.
    No downgrade goes below the first revision, whose undoing drops every table (one step too many, or FIRST-1):
    emptying a plant's database takes the word base.
    """
    from alembic.util import CommandError

    from services.db.migrate import current, downgrade, downgrade_drops_every_table

    at = current(ctx.settings.database_url)
    if at is not None and revision != "base":
        try:
            drops = downgrade_drops_every_table(at, revision)
        except CommandError as exc:
            raise click.ClickException(f"cannot downgrade from {at} to {revision!r}: {exc}") from None
        if drops:
            raise click.ClickException(
                f"the database is at {at}: downgrading to {revision} goes below the first revision and drops every "
                "table with its coils and feedback; run `coilguard db downgrade base` if that is what you mean"
            )
    downgrade(ctx.settings.database_url, revision)
    click.echo(f"database at revision {current(ctx.settings.database_url) or 'base'}")
