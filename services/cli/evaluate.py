"""``coilguard evaluate``: the coil paper's protocol (repeated k-fold CV and a gold set) for every assessor."""

from __future__ import annotations

from pathlib import Path

import click

from services.cli.base import AppContext, cli, coil_assessor_kinds, pass_ctx


@cli.command()
@click.option("--assessors", default="cnn,yolo,effnet,siamese", show_default=True, help="Comma-separated kinds.")
@click.option("--data", "data_spec", help="Development data: sim:N or .npz  [default: sim:4542; --quick: sim:2000]")
@click.option("--folds", type=click.IntRange(min=2), help="Cross-validation folds  [default: 5; --quick: 2]")
@click.option(
    "--repeats",
    type=click.IntRange(min=0),
    help="Cross-validation repeats, 0: gold set only  [default: 10; --quick: 1]",
)
@click.option(
    "--quick",
    is_flag=True,
    help="2 folds × 1 repeat on 2,000 coils with quick settings (minutes); options given explicitly still hold.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KIND.KEY=VALUE", help="e.g. cnn.depth=10")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Report folder (default REPORT_DIR/…).")
@pass_ctx
def evaluate(
    ctx: AppContext,
    assessors: str,
    data_spec: str | None,
    folds: int | None,
    repeats: int | None,
    quick: bool,
    seed: int,
    overrides: tuple[str, ...],
    out: Path | None,
) -> None:
    """Cross-validate and test on a gold set every assessor and the ensemble; write a table and plots."""
    from datetime import UTC, datetime

    from ml.assessors.registry import available
    from ml.dataset import CoilDataset
    from ml.evaluation.protocol import Plan
    from ml.evaluation.protocol import evaluate as run_evaluation
    from ml.evaluation.report import gold_table, write_report
    from ml.sim.gold import check_apart, gold_for
    from services.cli.models import load_data, parse_setting
    from services.progress import make_progress

    installed = available()
    kinds = coil_assessor_kinds(assessors, "--assessors")
    settings: dict[str, dict] = {k: dict(installed[k].quick_settings) if quick else {} for k in kinds}
    for text in overrides:
        key, value = parse_setting(text)
        kind, _, name = key.partition(".")
        if kind not in settings or not name:
            raise click.BadParameter(f"expected KIND.KEY=VALUE with KIND one of {kinds}", param_hint="--set")
        settings[kind][name] = value
    # --quick fills only what was not given: `--quick --repeats 0` is a quick gold-set-only run
    data_spec = data_spec or ("sim:2000" if quick else "sim:4542")
    folds = folds if folds is not None else 2 if quick else 5
    repeats = repeats if repeats is not None else 1 if quick else 10
    plan = Plan(
        kinds=kinds, settings=settings, n_splits=folds, n_repeats=repeats, seed=seed, device=ctx.settings.device
    )
    dev = load_data(data_spec, seed)
    if not isinstance(dev, CoilDataset):
        raise click.BadParameter("the protocol needs coils (sim:N or a .npz dataset), not images", param_hint="--data")
    if len(unique := dev.unique()) < len(dev):  # e.g. a ReTrain's kept data: copies would sit in both folds
        click.echo(f"note: {len(dev) - len(unique)} repeated rows of the same coils dropped; each coil counts once")
        dev = unique
    try:
        plan.check_data(dev)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    gold = gold_for(dev, seed)
    if gold.meta["seed"] != seed:
        click.echo(
            f"note: the gold set comes from line {gold.meta['seed']}, the one the development data was simulated on"
        )
    try:
        check_apart(dev, gold)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    out = out or ctx.settings.report_dir / f"evaluation-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    click.echo(
        f"evaluating {', '.join(kinds)} on {len(dev)} coils ({dev.n_nok} NOK), {folds}×{repeats} CV, "
        f"gold set {len(gold)} coils; {plan.n_fits} trainings on {ctx.settings.device}"
    )
    with make_progress() as progress:
        task = progress.add_task("evaluate", total=plan.n_fits, status="")

        def on_event(event: dict) -> None:
            if event.get("done"):
                progress.advance(task)
            elif event["stage"] == "cv":
                progress.update(
                    task, status=f"CV repeat {event['repeat'] + 1} fold {event['fold'] + 1}: {event['kind']}"
                )
            else:
                progress.update(task, status=f"gold set: training {event['kind']} on all data")

        evaluation = run_evaluation(dev, gold, plan, on_event)
    report = write_report(evaluation, out)
    click.echo(gold_table(evaluation))
    click.echo(f"report: {report}")
