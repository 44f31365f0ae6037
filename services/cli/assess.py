"""``coilguard assess``: the AssessCoils worker."""

from __future__ import annotations

import click

from services.cli.base import AppContext, cli, pass_ctx


@cli.command()
@click.option("--client-id", help="MQTT client id (the persistent session is tied to it).")
@pass_ctx
def assess(ctx: AppContext, client_id: str | None) -> None:
    """The AssessCoils worker: assess every coil on the sensor topics until stopped."""
    from services.workers.assess import AssessWorker

    AssessWorker(ctx.settings, client_id=client_id).run()
