"""The ``coilguard`` command line (DESIGN §5). Each command is a thin shell over services and workflows.

One module per command group; importing a module registers its commands on :data:`cli`.
"""

from __future__ import annotations

import sys

import click

from services.cli import assess, db, demo, evaluate, line, loop, models, ops  # noqa: F401  (registers the commands)
from services.cli.base import cli
from services.config import ConfigError
from services.mqtt.broker import BrokerUnavailable


def main() -> None:
    try:
        cli(prog_name="coilguard")
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except BrokerUnavailable as exc:  # `up` or `demo` on a port another process holds: what to do, not a traceback
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


__all__ = ["cli", "main"]
