"""``coilguard train`` and ``coilguard models``: model work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from services.cli.base import AppContext, cli, pass_ctx, require_schema


@cli.command()
@click.option("--assessor", "kind", required=True, help="Assessor key (see `coilguard models --kinds`).")
@click.option(
    "--data",
    "data_spec",
    default="sim:4542",
    show_default=True,
    help="sim:N, a dataset .npz file, or an image folder (one subfolder per class, optional .png masks).",
)
@click.option("--name", help="Registry name (default: the assessor key).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Assessor setting, e.g. epochs=10.")
@click.option("--seed", default=0, show_default=True, help="Seed for the data (sim:N) and the training.")
@click.option("--register/--no-register", default=False, help="Register the model and make it the active version.")
@click.option(
    "--unless-serving",
    is_flag=True,
    help="With --register: train nothing when a version of this name serves already (a first model's bootstrap, "
    "run again at every start, must not replace a retrained one).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save here instead (no registry); without --out or --register, under MODEL_DIR/unregistered/.",
)
@pass_ctx
def train(
    ctx: AppContext,
    kind: str,
    data_spec: str,
    name: str | None,
    overrides: tuple[str, ...],
    seed: int,
    register: bool,
    unless_serving: bool,
    out: Path | None,
) -> None:
    """Train an assessor, save its artifact and (with --register) put it into service."""
    from ml.assessors.registry import UnknownAssessor, create
    from ml.dataset import CoilDataset
    from services.db.engine import engine_for
    from services.db.repositories import SqlModelRegistry
    from services.progress import fit_progress, validation_summary
    from workflows.ports import NO_ACTIVE_VERSION, ChampionChanged
    from workflows.training import check_can_vote, check_model_name, check_name_free
    from workflows.training import register as register_model

    settings = ctx.settings
    options = dict(parse_setting(o) for o in overrides)
    if "seed" in options:  # it would seed the training and not the data, and the manifest would say one seed
        raise click.BadParameter("the seed is --seed (it seeds the data and the training alike)", param_hint="--set")
    options["seed"] = seed
    try:
        assessor = create(kind, options, name=name)
    except UnknownAssessor as exc:
        raise click.BadParameter(str(exc), param_hint="--assessor") from None
    except ValueError as exc:  # pydantic validation of the settings
        raise click.BadParameter(str(exc), param_hint="--set") from None
    try:
        check_model_name(assessor.name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None
    if unless_serving and not register:
        raise click.UsageError("--unless-serving goes with --register")
    if register:  # before the training, not after it
        require_schema(settings)
        try:
            with engine_for(settings.database_url) as engine:
                check_name_free(SqlModelRegistry(engine), assessor.name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--name") from None
        if unless_serving and (serving := _serving_version(settings.database_url, assessor.name)) is not None:
            click.echo(f"{assessor.name} v{serving} serves already; nothing trained (--unless-serving)")
            return
    data = load_data(data_spec, seed)
    if isinstance(data, CoilDataset):
        what = f"{len(data)} coils, {data.n_nok} NOK"
        if assessor.consumes == "image":  # allowed (#7), but in service it sees surface images, not renders
            click.echo(
                f"note: {kind} learns here from coil matrices rendered as images, yet in service it votes only on "
                "coils whose messages carry surface images (and abstains on the rest); train it on a folder of "
                "labelled surface images for that",
                err=True,
            )
    else:
        if assessor.consumes != "image":
            raise click.BadParameter(f"{kind} assesses coil matrices, not images", param_hint="--data")
        what = f"{len(data)} images of {len(data.classes)} classes, {int(data.nok.sum())} with defects"
    click.echo(f"training {assessor.name} ({kind}) on {what}, device {settings.device}")
    with fit_progress(f"train {assessor.name}", assessor.settings.epochs) as on_epoch:
        report = assessor.fit(data, device=settings.device, callback=on_epoch)
    validation = validation_summary(report.metrics.get("validation", {}))
    click.echo(f"done in {report.duration_s:.0f} s, {report.epochs_run} epochs on {report.device}: {validation}")
    # what --data said, so that the manifest names the data and not only its counts and digest
    assessor.training_data = {**assessor.training_data, "spec": _data_provenance(data_spec, seed)}
    refused = None
    if register:
        try:
            check_can_vote(assessor)
        except ValueError as exc:  # kept, so the hours are not lost, but not registered
            refused, register = str(exc), False
    if out is None and not register:  # an hour of training is not thrown away for a missing option
        out = unregistered_dir(settings.model_dir, assessor.name)
    if out is not None:
        try:
            assessor.save(out)
        except OSError as exc:  # MODEL_DIR belongs to the services, say: the hour of training is not lost silently
            raise click.ClickException(
                f"could not save the model to {out}: {exc} (give --out a folder you can write)"
            ) from None
        click.echo(f"saved to {out}")
    if refused is not None:
        raise click.ClickException(f"not registered: {refused}")
    if register:
        with engine_for(settings.database_url) as engine:
            try:
                record = register_model(
                    assessor,
                    SqlModelRegistry(engine),
                    settings.model_dir,
                    status="active",
                    dataset=data if isinstance(data, CoilDataset) else None,  # image folders stay where they are
                    replacing=NO_ACTIVE_VERSION if unless_serving else None,  # none served when the training began
                )
            except ChampionChanged as exc:
                if not unless_serving:  # the active version changed under the registration: not in service
                    raise click.ClickException(
                        f"{assessor.name} v{assessor.version} was not put into service: {exc}"
                    ) from None
                # another bootstrap, or an operator, put a version in service meanwhile
                serving = _serving_version(settings.database_url, assessor.name)
                click.echo(
                    f"{assessor.name} v{serving} went into service while this one trained; v{assessor.version} stays "
                    "a candidate (--unless-serving)"
                )
                return
        click.echo(f"registered {record.name} v{record.version} (active) at {settings.model_dir / record.artifact_uri}")


def unregistered_dir(model_dir: Path, name: str) -> Path:
    """Where ``train`` without ``--out`` or ``--register`` saves: beside the registered models, never one of them."""
    from datetime import UTC, datetime

    return Path(model_dir) / "unregistered" / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}"


def _data_provenance(spec: str, seed: int) -> dict[str, Any]:
    """``--data`` as the manifest records it: simulated coils with their seed, or the file or folder's full path."""
    if spec.startswith("sim:"):
        return {"data": spec, "seed": seed}
    return {"data": str(Path(spec).resolve())}


def _serving_version(database_url: str, name: str) -> int | None:
    from services.db.engine import engine_for
    from services.db.repositories import SqlModelRegistry

    with engine_for(database_url) as engine:
        return next((r.version for r in SqlModelRegistry(engine).active_models() if r.name == name), None)


def load_data(spec: str, seed: int) -> Any:
    """``--data`` of ``train`` and ``evaluate`` (see :func:`workflows.training.training_data`); a bad one is a
    usage error naming the option."""
    from workflows.training import training_data

    try:
        return training_data(spec, seed=seed)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None


def parse_setting(text: str) -> tuple[str, object]:
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--set")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


@cli.group("models", invoke_without_command=True)
@click.option("--kinds", is_flag=True, help="List the installed assessor kinds instead.")
@click.option("--all", "show_all", is_flag=True, help="Include retired and failed versions.")
@click.pass_context
def models_(click_ctx: click.Context, kinds: bool, show_all: bool) -> None:
    """The registered models and their versions (or the installed assessor kinds); `promote` and `retire`
    change which versions serve."""
    if click_ctx.invoked_subcommand is None:
        list_models(click_ctx.ensure_object(AppContext), kinds, show_all)


@models_.command("promote")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@pass_ctx
def promote(ctx: AppContext, name: str, version: int) -> None:
    """Put NAME vVERSION in service (a rollback, or a candidate); the name's active version is retired.

    Refused when the version's files do not load or do not match the registry's checksum."""
    from services.workers.assess import RELOAD_POLL_S
    from workflows.versions import promote_version

    change = _change_versions(ctx, promote_version, name, version, model_dir=ctx.settings.model_dir)
    before = f", retired v{change.retired}" if change.retired else ""
    click.echo(
        f"promoted {name} v{version}{before}; workers reload on the model event, or within {RELOAD_POLL_S:.0f} s"
    )
    for warning in change.warnings:
        click.echo(f"warning: {name} v{version}: {warning}", err=True)


@models_.command("retire")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@click.option("--force", is_flag=True, help="Retire it even if it is the last active version left in the registry.")
@pass_ctx
def retire(ctx: AppContext, name: str, version: int, force: bool) -> None:
    """Take NAME vVERSION out of service (or out of the candidates)."""
    from workflows.versions import retire_version

    change = _change_versions(ctx, retire_version, name, version, force=force)
    click.echo(f"retired {name} v{version}")
    if change.active_left == 0:
        click.echo(
            "no version of any model is active now: running workers keep the ensemble they serve, a worker that "
            "starts waits for one; promote a version to change that",
            err=True,
        )
    elif not change.name_active:
        click.echo(f"{name} has no active version now: the ensemble votes without it", err=True)


@models_.command("prune")
@click.option(
    "--keep",
    type=click.IntRange(min=1),  # 0 would remove the champion just retired, which workers serve until their next poll
    default=None,
    help="Retired versions kept per name [default: MODEL_KEEP, 3; also 3 where MODEL_KEEP is off].",
)
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
@pass_ctx
def prune(ctx: AppContext, keep: int | None, dry_run: bool) -> None:
    """Free MODEL_DIR of the files no version in service needs: the folders of retired versions beyond the KEEP per
    name that served last and of failed ones, training sets no kept version was trained on, and what killed
    registrations left behind. Active and candidate versions, and files written in the last day, are never
    touched; the registry's rows stay. ReTrain does the same after each pass unless MODEL_KEEP is off."""
    from services.db.engine import engine_for
    from services.db.repositories import SqlModelRegistry
    from workflows.model_store import KEEP_RETIRED, plan_prune
    from workflows.model_store import prune as prune_files

    require_schema(ctx.settings)
    with engine_for(ctx.settings.database_url) as engine:
        records = SqlModelRegistry(engine).all()
    if keep is None:
        keep = ctx.settings.model_keep if ctx.settings.model_keep is not None else KEEP_RETIRED
    plan = plan_prune(records, ctx.settings.model_dir, keep=keep)
    for problem in plan.unreadable:
        click.echo(f"training sets kept: cannot read the manifest of {problem}", err=True)
    for record, path in plan.versions:
        click.echo(f"{record.name} v{record.version} ({record.status}): {path}")
    for path in plan.data + plan.leftovers:
        click.echo(str(path))
    if dry_run:
        click.echo(f"would free {plan.size() / 1e6:.1f} MB ({len(plan.paths)} paths); nothing removed")
        return
    freed = prune_files(plan)
    click.echo(f"freed {freed / 1e6:.1f} MB ({len(plan.paths)} paths)")


def _change_versions(ctx: AppContext, change: Any, name: str, version: int, **options: Any) -> Any:
    """Run a :mod:`workflows.versions` change on the configured registry; a refusal is an error that says why."""
    from services.db.engine import engine_for
    from services.db.repositories import SqlModelRegistry
    from services.jobs import MqttEventPublisher
    from services.runtime import topics
    from workflows.versions import VersionChangeRefused

    require_schema(ctx.settings)
    with engine_for(ctx.settings.database_url) as engine:
        try:
            return change(
                SqlModelRegistry(engine),
                name=name,
                version=version,
                publisher=MqttEventPublisher(ctx.settings, purpose="models"),
                model_events=topics(ctx.settings).model_events,
                **options,
            )
        except VersionChangeRefused as exc:
            raise click.ClickException(str(exc)) from None


def list_models(ctx: AppContext, kinds: bool, show_all: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if kinds:
        from ml.assessors.registry import available

        table = Table("kind", "consumes", "class")
        for key, cls in sorted(available().items()):
            table.add_row(key, cls.consumes, f"{cls.__module__}.{cls.__qualname__}")
        console.print(table)
        return
    from services.db.engine import engine_for
    from services.db.repositories import SqlModelRegistry
    from workflows.training import resolve_artifact

    require_schema(ctx.settings)
    with engine_for(ctx.settings.database_url) as engine:
        records = SqlModelRegistry(engine).all()
    table = Table("name", "version", "kind", "status", "validation NOK-F1", "created", "artifact")
    missing = 0
    for r in records:
        if not show_all and r.status not in ("active", "candidate"):
            continue
        f1 = (r.metrics.get("validation") or {}).get("f1_nok")
        created = r.created_at.strftime("%Y-%m-%d %H:%M") if r.created_at else ""
        # a registration killed between recording the row and moving the files in leaves a row without files
        found = resolve_artifact(ctx.settings.model_dir, r.artifact_uri).is_dir()
        missing += not found and r.status in ("active", "candidate")  # retired folders may be pruned
        artifact = r.artifact_uri if found else f"{r.artifact_uri} (missing)"
        f1_text = f"{f1:.3f}" if f1 is not None else ""
        table.add_row(r.name, str(r.version), r.kind, r.status, f1_text, created, artifact)
    console.print(table)
    if missing:
        click.echo(
            f"{missing} version(s) have no files under MODEL_DIR ({ctx.settings.model_dir}): if this host mounts "
            "it, they cannot be served; retire them (or restore their folders)",
            err=True,
        )
