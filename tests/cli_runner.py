"""The command line run as an operator or a CronJob runs it: a fresh ``python -m services.cli`` process."""

from __future__ import annotations

import os
import subprocess
import sys


def coilguard(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
