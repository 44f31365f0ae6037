"""``coilguard simulate`` and ``coilguard dataset``: the simulated galvanizing line."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import click

from services.cli.base import AppContext, cli, pass_ctx


def _simulator(seed: int, line: str, drift: str | None, drift_at: int, ramp: int, severity: float, prefix: str):
    from ml.sim import DriftConfig, LineConfig, LineSimulator

    drift_config = DriftConfig(scenario=drift, start=drift_at, ramp=ramp, severity=severity) if drift else None
    return LineSimulator(LineConfig(seed=seed, line=line, id_prefix=prefix, drift=drift_config))


_sim_options = [
    click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives the same coils."),
    click.option("--line", default="galv-1", show_default=True, help="Line name (topic level and payload)."),
    click.option("--drift", type=click.Choice(["sensor-drift", "knife-wear", "product-mix", "new-defect"])),
    click.option("--drift-at", default=0, show_default=True, help="Coil index where the drift starts."),
    click.option("--drift-ramp", default=200, show_default=True, help="Coils over which the drift grows."),
    click.option("--severity", default=1.0, show_default=True, help="Drift strength (1 = the scenario's full size)."),
    click.option("--id-prefix", default="C", show_default=True, help="Coil id prefix, e.g. C → C-2026-000001."),
]


def sim_options(func):
    for option in reversed(_sim_options):
        func = option(func)
    return func


@cli.command()
@click.option("--coils", "n_coils", default=100, show_default=True, help="How many coils to publish.")
@click.option("--rate", default=10.0, show_default=True, help="Coils per second (0 = as fast as possible).")
@click.option("--binary", is_flag=True, help="Send thickness_b64 instead of nested lists.")
@sim_options
@pass_ctx
def simulate(
    ctx: AppContext,
    n_coils: int,
    rate: float,
    binary: bool,
    seed: int,
    line: str,
    drift: str | None,
    drift_at: int,
    drift_ramp: int,
    severity: float,
    id_prefix: str,
) -> None:
    """Publish simulated coils (CoilMessage v1) as a sensor gateway would."""
    from rich.progress import Progress

    from services.line import publish_coils
    from services.runtime import broker_for, mqtt_client, topics

    settings = ctx.settings
    sim = _simulator(seed, line, drift, drift_at, drift_ramp, severity, id_prefix)
    with broker_for(settings, host_embedded=False) as url, mqtt_client(settings, url) as client:
        with Progress(transient=True) as progress:
            task = progress.add_task(f"publishing to {url.redacted()}", total=n_coils)
            start = time.perf_counter()
            sent = publish_coils(
                client,
                topics(settings),
                itertools.islice(sim.stream(), n_coils),
                rate=rate or None,
                binary=binary,
                on_published=lambda *_: progress.advance(task),
            )
        client.flush()
        if refused := client.take_refused():
            reasons = ", ".join(sorted({reason for _, reason in refused}))
            raise click.ClickException(
                f"the broker refused {len(refused)} of the {sent} coils on {topics(settings).sensors(line)} "
                f"({reasons}): does its ACL let this account publish there?"
            )
    took = time.perf_counter() - start
    click.echo(f"published {sent} coils on {topics(settings).sensors(line)} in {took:.1f} s ({sent / took:.0f}/s)")


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
    drift_at: int,
    drift_ramp: int,
    severity: float,
    id_prefix: str,
) -> None:
    """Write a simulated dataset (X, y, coil_id, produced_at, meta) to an .npz file."""
    sim = _simulator(seed, line, drift, drift_at, drift_ramp, severity, id_prefix)
    data = sim.dataset(n_coils)
    written = data.save(out)
    click.echo(f"wrote {len(data)} coils ({data.n_nok} NOK, {data.n_nok / len(data):.1%}) to {written}")
