"""``coilguard db upgrade|downgrade``: schema migrations."""

from __future__ import annotations

import click

from services.cli.base import AppContext, cli, pass_ctx


@cli.group()
def db() -> None:
    """Database schema migrations (Alembic)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_ctx
def db_upgrade(ctx: AppContext, revision: str) -> None:
    """Migrate the database up to REVISION (default: the newest)."""
    from services.db.migrate import current, upgrade

    upgrade(ctx.settings.database_url, revision)
    click.echo(f"database at revision {current(ctx.settings.database_url)}")


@db.command("downgrade", context_settings={"ignore_unknown_options": True})  # so that `-1` is a revision
@click.argument("revision", default="-1")
@pass_ctx
def db_downgrade(ctx: AppContext, revision: str) -> None:
    """Migrate the database down to REVISION: -1 for one step (the default), a revision id, or base (drops every table).

    A bare `db downgrade` (DESIGN §5) undoes the newest revision only, as services.db.migrate.downgrade does,
    and never the first one, whose undoing drops every table: emptying a plant's database takes the word base.
    """
    from services.db.migrate import current, downgrade, first

    at = current(ctx.settings.database_url)
    if revision == "-1" and at is not None and at == first():
        raise click.ClickException(
            f"the database is at {at}, the first revision: one step down drops every table with its coils and "
            "feedback; run `coilguard db downgrade base` if that is what you mean"
        )
    downgrade(ctx.settings.database_url, revision)
    click.echo(f"database at revision {current(ctx.settings.database_url) or 'base'}")
