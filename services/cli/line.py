"""``coilguard simulate`` and ``coilguard dataset``: the simulated galvanizing line."""

from __future__ import annotations

import itertools
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import click

from services.cli.base import AppContext, cli, pass_ctx
from services.line import CounterError, LineCounter, LinePosition


def _simulator(
    seed: int,
    line: str,
    drift: str | None,
    drift_at: int | None,
    ramp: int,
    severity: float,
    prefix: str,
    position: LinePosition | None = None,
):
    """The line, from ``position`` on when given: coil ``position.coils + 1`` next, its clock where it stood."""
    from ml.sim import DriftConfig, LineConfig, LineSimulator

    try:
        drift_config = DriftConfig(scenario=drift, start=drift_at, ramp=ramp, severity=severity) if drift else None
        config = LineConfig(seed=seed, line=line, id_prefix=prefix, drift=drift_config)
        if position is not None:
            config = replace(config, first_index=position.coils, start=position.clock or config.start)
    except ValueError as exc:  # an option the line cannot take: said as such, not as a traceback
        raise click.UsageError(str(exc)) from exc
    return LineSimulator(config)


def _line_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """The CoilMessage's rule for a line (DESIGN §3): a coil of another line would only be rejected."""
    from workflows.messages import LINE_PATTERN, LINE_RULE

    if not LINE_PATTERN.fullmatch(value):
        raise click.BadParameter(f"{LINE_RULE} (an MQTT topic level)")
    return value


_sim_options = [
    click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives the same coils."),
    click.option(
        "--line", default="galv-1", show_default=True, callback=_line_name, help="Line name (topic level and payload)."
    ),
    click.option("--drift", type=click.Choice(["sensor-drift", "knife-wear", "product-mix", "new-defect"])),
    click.option(
        "--drift-at",
        type=click.IntRange(min=0),
        help="The line's coil index where the drift starts (default: this run's first coil).",
    ),
    click.option(
        "--drift-ramp",
        default=200,
        show_default=True,
        type=click.IntRange(min=0),
        help="Coils over which the drift grows.",
    ),
    click.option(
        "--severity",
        default=1.0,
        show_default=True,
        type=click.FloatRange(min=0),
        help="Drift strength (1 = the scenario's full size, at most 3).",
    ),
    click.option("--id-prefix", default="C", show_default=True, help="Coil id prefix, e.g. C → C-2026-000001."),
]


def sim_options(func):
    for option in reversed(_sim_options):
        func = option(func)
    return func


@cli.command()
@click.option("--coils", "n_coils", default=100, show_default=True, type=click.IntRange(min=0), help="How many coils.")
@click.option(
    "--rate", default=10.0, show_default=True, type=click.FloatRange(min=0), help="Coils per second (0 = at once)."
)
@click.option("--binary", is_flag=True, help="Send thickness_b64 instead of nested lists.")
@click.option(
    "--start",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Coils the line has made before this run: the first one sent is coil START+1, and so is its id.",
)
@click.option(
    "--counter",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file that keeps the line's coil count and clock, as a gateway keeps its counter: each run goes on "
    "after the last coil the one before sent (created at the first run; instead of --start).",
)
@sim_options
@pass_ctx
def simulate(
    ctx: AppContext,
    n_coils: int,
    rate: float,
    binary: bool,
    start: int,
    counter: Path | None,
    seed: int,
    line: str,
    drift: str | None,
    drift_at: int | None,
    drift_ramp: int,
    severity: float,
    id_prefix: str,
) -> None:
    """Publish simulated coils (CoilMessage v1) as a sensor gateway would."""
    from rich.progress import Progress

    from services.line import publish_coils
    from services.runtime import broker_for, mqtt_client, topics

    settings = ctx.settings
    if counter is not None and start:
        raise click.UsageError("--start and --counter both say where the line stands: give one")
    with ExitStack() as stack:
        try:
            held = stack.enter_context(LineCounter(counter)) if counter is not None else None
            position = held.start if held is not None else LinePosition(start)
            sim = _simulator(seed, line, drift, drift_at, drift_ramp, severity, id_prefix, position)
            coils = itertools.islice(sim.stream(), n_coils)
            with broker_for(settings, host_embedded=False) as url, mqtt_client(settings, url) as client:
                with Progress(transient=True) as progress:
                    task = progress.add_task(f"publishing to {url.redacted()}", total=n_coils)
                    began = time.perf_counter()
                    sent = publish_coils(
                        client,
                        topics(settings),
                        held.counted(coils) if held is not None else coils,
                        rate=rate or None,
                        binary=binary,
                        on_published=lambda *_: progress.advance(task),
                    )
                if not client.flush():  # the coils may still be lost: not "published"
                    raise click.ClickException(
                        f"the broker did not confirm the {sent} coils on {topics(settings).sensors(line)} within 30 s"
                    )
                if refused := client.take_refused():
                    reasons = ", ".join(sorted({reason for _, reason in refused}))
                    raise click.ClickException(
                        f"the broker refused {len(refused)} of the {sent} coils on {topics(settings).sensors(line)} "
                        f"({reasons}): does its ACL let this account publish there?"
                    )
        except CounterError as exc:
            raise click.ClickException(str(exc)) from exc
    took = time.perf_counter() - began
    click.echo(f"published {sent} coils on {topics(settings).sensors(line)} in {took:.1f} s ({sent / took:.0f}/s)")
    if counter is not None:
        click.echo(f"the line has made {position.coils + sent} coils; the next run goes on from there ({counter})")


@cli.command()
@click.option(
    "--coils",
    "n_coils",
    default=4542,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many coils (the paper had 4542).",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .npz file.")
@sim_options
def dataset(
    n_coils: int,
    out: Path,
    seed: int,
    line: str,
    drift: str | None,
    drift_at: int | None,
    drift_ramp: int,
    severity: float,
    id_prefix: str,
) -> None:
    """Write a simulated dataset (X, y, coil_id, produced_at, meta) to an .npz file."""
    sim = _simulator(seed, line, drift, drift_at, drift_ramp, severity, id_prefix)
    data = sim.dataset(n_coils)
    written = data.save(out)
    click.echo(f"wrote {len(data)} coils ({data.n_nok} NOK, {data.n_nok / len(data):.1%}) to {written}")
