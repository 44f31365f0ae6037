"""The ``coilguard`` command group and what every command shares: lazily loaded, validated settings."""

from __future__ import annotations

import logging

import click

from services.config import ConfigError, Settings, load_settings, unknown_variables
from services.logs import setup_logging

log = logging.getLogger(__name__)


class AppContext:
    """Settings are loaded lazily so ``--help`` works even with a broken environment."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings()
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
            setup_logging(self._settings.log_level, self._settings.log_format)
            for name in unknown_variables():
                log.warning("%s is not a coilguard setting: ignored", name)
        return self._settings


pass_ctx = click.make_pass_decorator(AppContext, ensure=True)


class DurationType(click.ParamType):
    """``60s``, ``15m``, ``24h``, ``7d`` … (positive): a bad one is a usage error naming the option, not a traceback."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        from services.config import parse_duration

        try:
            duration = parse_duration(value)  # type: ignore[arg-type]
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if duration.total_seconds() <= 0:
            self.fail(f"{value!r} is not a positive duration", param, ctx)
        return duration


DURATION = DurationType()


def require_schema(settings: Settings) -> None:
    """Stop, before any work, when the database is behind this release's schema: a fresh SQLite file or a
    plant database not yet migrated would otherwise fail halfway (after an hour of training, say) with
    a bare "no such table"."""
    from services.db.migrate import schema_problem

    if problem := schema_problem(settings.database_url):
        raise click.ClickException(problem)


def coil_assessor_kinds(text: str, param_hint: str) -> list[str]:
    """Comma-separated assessor keys, each installed and assessing coil matrices: the image assessors abstain
    on coils without surface images, so a coil-only protocol or demo cannot train or judge them."""
    from ml.assessors.registry import available

    installed = available()
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds:
        raise click.BadParameter("name at least one assessor", param_hint=param_hint)
    if repeated := sorted({k for k in kinds if kinds.count(k) > 1}):  # one row each, and one vote each
        raise click.BadParameter(f"named more than once: {', '.join(repeated)}", param_hint=param_hint)
    missing = [k for k in kinds if k not in installed]
    if missing:
        raise click.BadParameter(
            f"not installed: {', '.join(missing)} (installed: {', '.join(sorted(installed))})", param_hint=param_hint
        )
    image_kinds = [k for k in kinds if installed[k].consumes != "matrix"]
    if image_kinds:
        verb = "assesses" if len(image_kinds) == 1 else "assess"
        raise click.BadParameter(
            f"{', '.join(image_kinds)} {verb} surface images, which these coils do not carry "
            "(the image benchmark is bench/image_defects.py)",
            param_hint=param_hint,
        )
    return kinds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """coilguard: assess galvanized coils on MQTT, learn from operators, retrain when wrong."""
