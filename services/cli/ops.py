"""``coilguard api``, ``drift`` and ``up``: running coilguard as services."""

from __future__ import annotations

from datetime import timedelta

import click

from services.cli.base import DURATION, AppContext, cli, pass_ctx, require_schema


@cli.command()
@click.option("--host", help="Listen address (default COILGUARD_API_HOST).")
@click.option("--port", type=click.IntRange(1, 65535), help="Listen port (default COILGUARD_API_PORT).")
@pass_ctx
def api(ctx: AppContext, host: str | None, port: int | None) -> None:
    """The REST API: status, models, coils, feedback, drift reports, /metrics (OpenAPI at /openapi.json)."""
    import uvicorn

    from services.api import create_app

    settings = ctx.settings
    # log_config=None: uvicorn's own logs go through coilguard's handler (text or JSON, like every process)
    uvicorn.run(
        create_app(settings),
        host=host or settings.api_host,
        port=port if port is not None else settings.api_port,
        log_config=None,
    )


@cli.command()
@click.option("--window", type=DURATION, help="How far back to look (e.g. 24h, 7d; default COILGUARD_DRIFT_WINDOW).")
@pass_ctx
def drift(ctx: AppContext, window: timedelta | None) -> None:
    """An Evidently drift report of recent coils against the active models' training data."""
    from services.drift import run_drift
    from workflows.drift_report import describe_columns

    settings = ctx.settings
    require_schema(settings)
    outcome = run_drift(settings, window=window)
    click.echo(f"{outcome.window_start:%Y-%m-%d %H:%M} – {outcome.window_end:%Y-%m-%d %H:%M} UTC: {outcome.describe()}")
    if outcome.result is not None:
        if outcome.result.drifted_columns:
            click.echo(f"drifted: {describe_columns(outcome.result.drifted_columns)}")
        click.echo(f"report under {settings.report_dir / 'drift'}")


@cli.command()
@click.option(
    "--older-than",
    type=DURATION,
    help="Only decisions stored at least this long ago: a running worker announces its newer ones itself. "
    "[default: ANNOUNCE_AFTER]",
)
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True)
@click.option("--line", help="Only this line's coils (e.g. one whose decision topic the broker still refuses).")
@pass_ctx
def announce(ctx: AppContext, older_than: timedelta | None, limit: int, line: str | None) -> None:
    """Announce decisions that are stored but never reached the broker (given up after an ACL refusal, held in a
    lost broker session), oldest first, once the cause is mended; each is marked published when confirmed. The
    scheduler does the same every ANNOUNCE_EVERY for those up to ANNOUNCE_MAX_AGE old; this is for older ones,
    for now, or for one line. A line the broker refuses is not offered further in the same run.

    A worker still holding one (its logs name the coils) offers it again every 10 s, and the decision may then go
    out twice (at least once, as QoS 1 is)."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.announce import AlreadyRunning, announce_unannounced

    settings = ctx.settings
    require_schema(settings)
    try:
        done = announce_unannounced(
            settings, settings.announce_after if older_than is None else older_than, limit, line
        )
    except (ConnectionError, AlreadyRunning) as exc:  # the broker away or silent: what it confirmed is marked
        raise click.ClickException(str(exc)) from None
    except SQLAlchemyError as exc:  # a chunk the broker took but the database would not mark goes out again
        raise click.ClickException(f"the database failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    click.echo(f"announced {len(done.announced)} stored decisions")
    if done.refused:
        reasons = ", ".join(sorted(set(done.refused.values())))
        raise click.ClickException(
            f"the broker refused {len(done.refused)} ({reasons}) on lines {', '.join(sorted(done.refused_lines))}, "
            f"e.g. coil {next(iter(done.refused))}: their decisions stay unannounced; does its ACL let this account "
            "publish on their decision topics?"
        )


@cli.command()
@pass_ctx
def up(ctx: AppContext) -> None:
    """Everything on one machine in one process: broker (when MQTT_URL=embedded), AssessCoils, scheduler, API."""
    from services.up import run_up

    run_up(ctx.settings, say=click.echo)
