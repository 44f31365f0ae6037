"""``coilguard demo``: the whole loop on one machine."""

from __future__ import annotations

import click

from services.cli.base import AppContext, cli, coil_assessor_kinds, pass_ctx


@cli.command()
@click.option("--seed", default=7, show_default=True, help="Seed of the simulated line and the models.")
@click.option(
    "--scenario",
    default="sensor-drift",
    show_default=True,
    type=click.Choice(["sensor-drift", "knife-wear", "product-mix", "new-defect"]),
    help="The drift injected halfway.",
)
@click.option(
    "--history",
    default=1500,
    show_default=True,
    type=click.IntRange(min=100),
    help="Simulated coils the initial ensemble learns from.",
)
@click.option("--before", default=600, show_default=True, type=click.IntRange(min=1), help="Coils before the drift.")
@click.option(
    "--after",
    default=600,
    show_default=True,
    type=click.IntRange(min=1),
    help="Coils after the retrained versions are in service.",
)
@click.option(
    "--rate",
    default=40.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Coils per second from the simulated line.",
)
@click.option(
    "--kinds",
    default="cnn,yolo,effnet,siamese",
    show_default=True,
    help="Assessors in the ensemble, trained at their quick settings.",
)
@pass_ctx
def demo(
    ctx: AppContext, seed: int, scenario: str, history: int, before: int, after: int, rate: float, kinds: str
) -> None:
    """The whole loop on one machine: train, assess, drift, score, retrain, recover (var/demo/)."""
    from services.demo import DemoFailed, run_demo

    chosen = coil_assessor_kinds(kinds, "--kinds")
    try:
        summary = run_demo(
            ctx.settings,
            seed=seed,
            scenario=scenario,
            history=history,
            before=before,
            after=after,
            rate=rate,
            kinds=tuple(chosen),
        )
    except DemoFailed as exc:
        raise click.ClickException(str(exc)) from None
    if summary["problems"]:  # the loop did not run as it should: not a success for `make demo`
        raise click.ClickException("the demo did not close the loop: " + "; ".join(summary["problems"]))
