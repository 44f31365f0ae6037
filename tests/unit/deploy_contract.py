"""What the compose file and the Kubernetes manifests may refer to: real ``coilguard`` commands (with
options that parse) and real settings. Shared by test_compose.py and test_k8s.py."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping

import click

from services.cli import cli
from services.config import ENV_PREFIX, Settings, load_settings

SETTING_NAMES = frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields)
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?+]([^}]*))?\}")


def invocations(argv: Iterable[str], entrypoint_is_coilguard: bool) -> list[list[str]]:
    """The ``coilguard`` argument lists in a container's command: the command itself when the image's
    entry point is ``coilguard``, or each ``coilguard …`` inside a ``sh -c`` script."""
    argv = [str(a) for a in argv]
    if argv[:2] == ["sh", "-c"] or argv[:2] == ["/bin/sh", "-c"]:
        found = []
        for part in re.split(r"&&|;|\|\|", argv[2]):
            words = shlex.split(part)
            if "coilguard" in words:
                found.append(words[words.index("coilguard") + 1 :])
        return found
    if argv and argv[0] == "coilguard":
        return [argv[1:]]
    return [argv] if entrypoint_is_coilguard else []


def check_invocation(argv: list[str]) -> str:
    """Parse ``argv`` with the real CLI, down to the leaf command; return its path (``db upgrade``).

    Unknown commands, unknown options and bad option values raise click's usual errors.
    """
    ctx = cli.make_context("coilguard", list(argv), resilient_parsing=False)
    path: list[str] = []
    command: click.Command = cli
    while isinstance(command, click.Group):
        rest = [*ctx.protected_args, *ctx.args]
        assert rest, f"coilguard {' '.join(argv)}: no command given"
        name, command, args = command.resolve_command(ctx, rest)
        assert command is not None, f"coilguard {' '.join(argv)}: no command {name!r}"
        path.append(str(name))
        ctx = command.make_context(str(name), args, parent=ctx, resilient_parsing=False)
    return " ".join(path)


def _fill(match: re.Match) -> str:
    """``${X:-default}`` → the default; ``${X}`` and ``${X:?message}`` → a stand-in value."""
    return match.group(2) if match.group(2) is not None and ":-" in match.group(0) else "x"


def check_settings(env: Mapping[str, object], where: str) -> None:
    """Every ``COILGUARD_*`` name is a setting, and the values (with ``${…}`` filled in) are accepted."""
    names = {k for k in env if str(k).startswith(ENV_PREFIX)}
    unknown = names - SETTING_NAMES
    assert not unknown, f"{where}: not settings of services/config.py: {sorted(unknown)}"
    values = {}
    for name in names:
        value = env[name]
        if value is None or isinstance(value, dict):  # valueFrom (Kubernetes): the value is elsewhere
            continue
        filled = _INTERPOLATION.sub(
            lambda m: "x" if m.group(2) is None or "?" in m.group(0) else m.group(2), str(value)
        )
        values[name.removeprefix(ENV_PREFIX).lower()] = filled
    load_settings(_env_file=None, **values)  # raises ConfigError naming the variable
