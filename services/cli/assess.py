"""``coilguard assess``: the AssessCoils worker."""

from __future__ import annotations

import click

from services.cli.base import AppContext, cli, pass_ctx


@cli.command()
@click.option(
    "--client-id",
    help="MQTT client id (the persistent session is tied to it; default: from the host name). "
    "Each worker needs its own, and the same one after a restart.",
)
@click.option(
    "--retire",
    is_flag=True,
    help="Remove a worker for good: assess what the broker kept for this client id, then end its session "
    "(otherwise the broker goes on queuing that worker's share of the stream).",
)
@pass_ctx
def assess(ctx: AppContext, client_id: str | None, retire: bool) -> None:
    """The AssessCoils worker: assess every coil on the sensor topics until stopped."""
    from services.workers.assess import AssessWorker

    if retire and not client_id:
        # not the id the environment gives: in an assess pod that is the live worker's own (its pod name), and
        # retiring it would take the session over from under that worker and end it
        raise click.UsageError("--retire needs the retired worker's --client-id, given on the command line")
    stats = AssessWorker(ctx.settings, client_id=client_id, retire=retire).run()
    if retire and stats.session_removed:
        click.echo(f"retired: {stats.decided} coils decided from its session, which is removed")
    elif retire:
        click.echo(
            f"stopped before the session was assessed to the end ({stats.decided} coils decided): it is kept; "
            "run the same command again to finish"
        )
