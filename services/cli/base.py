"""The ``coilguard`` command group and what every command shares: lazily loaded, validated settings."""

from __future__ import annotations

import click

from services.config import ConfigError, Settings, load_settings
from services.logs import setup_logging


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
        return self._settings


pass_ctx = click.make_pass_decorator(AppContext, ensure=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """coilguard: assess galvanized coils on MQTT, learn from operators, retrain when wrong."""
