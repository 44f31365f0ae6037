"""``coilguard feedback``, ``score`` and ``retrain``: the human-in-the-loop commands."""

from __future__ import annotations

import logging
import signal
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import click

from services.cli.base import DURATION, AppContext, cli, pass_ctx, require_schema

if TYPE_CHECKING:
    from services.api.schemas import FeedbackIn

log = logging.getLogger(__name__)


_FEEDBACK_PARAMS = {"coil_id": "COIL_ID", "label": "LABEL", "operator": "--operator", "comment": "--comment"}


@cli.command()
@click.argument("coil_id")
@click.argument("label", type=click.Choice(["OK", "NOK"]))
@click.option("--operator", required=True, help="Who checked the coil (surrounding blanks are trimmed).")
@click.option("--comment", help="Free text, e.g. what was seen (at most 2000 characters).")
@pass_ctx
def feedback(ctx: AppContext, coil_id: str, label: str, operator: str, comment: str | None) -> None:
    """Record an operator's verdict on a coil (the latest verdict for a coil wins)."""
    from services.db.engine import engine_for
    from services.db.repositories import SqlFeedbackStore
    from workflows.ports import UnknownCoil

    given = _feedback_in(coil_id=coil_id, label=label, operator=operator, comment=comment)
    require_schema(ctx.settings)
    try:
        with engine_for(ctx.settings.database_url) as engine:
            row = SqlFeedbackStore(engine).add(given.coil_id, given.label, given.operator, given.comment)
    except UnknownCoil as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"feedback #{row}: {given.coil_id} is {given.label} according to {given.operator}")


def _feedback_in(**fields: str | None) -> FeedbackIn:
    """The API's own request model, so that the command stores exactly what ``POST /feedback`` would:
    a blank operator or one that is not one line of visible text, control characters in a comment or an
    overlong one are refused (exit 2)."""
    from pydantic import ValidationError

    from services.api.schemas import FeedbackIn

    try:
        return FeedbackIn.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        raise click.BadParameter(error["msg"], param_hint=_FEEDBACK_PARAMS.get(field, field)) from None


@cli.command()
@click.option("--every", type=DURATION, help="Repeat on this interval (e.g. 60s, 5m) instead of running once.")
@click.option("--recount", is_flag=True, help="Count all feedback again (the tallies start afresh at this run).")
@pass_ctx
def score(ctx: AppContext, every: timedelta | None, recount: bool) -> None:
    """ModelScore: each active model's agreement with operator feedback, into mperformance."""
    from services.db.engine import engine_for
    from services.db.repositories import ScorePassBlocked, SqlScoreStore
    from services.jobs import run_score

    def once() -> None:
        try:
            scored_models = run_score(ctx.settings)
        except ScorePassBlocked as exc:  # said in one line: what holds it, and that nothing was counted
            raise click.ClickException(str(exc)) from None
        for scored in scored_models:
            click.echo(scored.describe())

    require_schema(ctx.settings)
    if recount:  # feedback rows deleted or edited by hand: the tallies cannot see that
        with engine_for(ctx.settings.database_url) as engine:
            SqlScoreStore(engine).forget_tallies()
    if every is None:
        once()
        return
    while True:  # until Ctrl-C or SIGTERM: a failed run (the database restarting, say) waits for the next tick
        try:
            once()
        except click.ClickException as exc:  # a pass blocked by an open edit: its reason, without a traceback
            log.warning("%s; trying again in %.0f s", exc.message, every.total_seconds())
        except Exception:
            log.exception("ModelScore failed; trying again in %.0f s", every.total_seconds())
        time.sleep(every.total_seconds())


@cli.command()
@click.option("--model", "names", multiple=True, help="Only this model (repeatable).")
@click.option(
    "--force",
    is_flag=True,
    help="Retrain even if the score rule does not ask for it, or its last run was rejected on the same inputs.",
)
@pass_ctx
def retrain(ctx: AppContext, names: tuple[str, ...], force: bool) -> None:
    """ReTrain once: every model below the score threshold (what the weekly CronJob runs)."""
    from services.jobs import run_retrain

    def terminate(*_: object) -> None:  # the CronJob's pod is being stopped: mark the run failed, exit
        raise SystemExit(143)

    require_schema(ctx.settings)
    if names:
        from services.db.engine import engine_for
        from services.db.repositories import SqlModelRegistry

        with engine_for(ctx.settings.database_url) as engine:  # not held open through hours of training
            active = {m.name for m in SqlModelRegistry(engine).active_models()}
        unknown = sorted(set(names) - active)
        if unknown:
            raise click.BadParameter(
                f"no active model named {', '.join(unknown)} (active: {', '.join(sorted(active)) or 'none'})",
                param_hint="--model",
            )
    signal.signal(signal.SIGTERM, terminate)
    outcomes = run_retrain(ctx.settings, names=list(names) or None, force=force)
    for o in outcomes:
        new = f" → v{o.challenger_version}" if o.challenger_version else ""
        click.echo(f"{o.model} v{o.version}{new}: {o.status} ({o.reason})")
    if any(o.status == "failed" for o in outcomes):
        raise SystemExit(1)


@cli.command()
@pass_ctx
def scheduler(ctx: AppContext) -> None:
    """Run ModelScore, ReTrain, drift reports and the announce pass on their schedules until stopped."""
    from services.scheduler import run_scheduler

    run_scheduler(ctx.settings)
