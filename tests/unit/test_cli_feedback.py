"""``coilguard feedback`` stores what ``POST /feedback`` would and refuses what it refuses, for the same
reason: both validate with the API's ``FeedbackIn``. Runs in-process on SQLite; no broker is involved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from services.cli import cli
from services.db import migrate
from services.db.engine import make_engine


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'coilguard.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO coils (coil_id, line, matrix) VALUES ('C-1', 'galv-1', :m)"),
            {"m": np.zeros((264, 18), dtype="<f4").tobytes()},
        )
    engine.dispose()
    return {"COILGUARD_DATABASE_URL": url}


def _stored(env: dict[str, str]) -> list[tuple]:
    engine = make_engine(env["COILGUARD_DATABASE_URL"])
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text("SELECT coil_id, operator, comment FROM feedback"))]
    engine.dispose()
    return rows


@pytest.mark.parametrize(
    ("args", "param", "reason"),
    [
        (["C-1", "OK", "--operator", ""], "--operator", "at least 1 character"),
        (["C-1", "OK", "--operator", "   "], "--operator", "at least 1 character"),
        (["C-1", "OK", "--operator", "x\x1b[2Jy"], "--operator", "visible characters"),
        (["C-1", "OK", "--operator", "a" * 129], "--operator", "at most 128 characters"),
        (["C-1", "NOK", "--operator", "anna", "--comment", "c" * 5000], "--comment", "at most 2000 characters"),
        (["C-1\n", "OK", "--operator", "anna"], "COIL_ID", "should match pattern"),
    ],
)
def test_what_the_api_refuses_the_command_refuses(
    env: dict[str, str], args: list[str], param: str, reason: str
) -> None:
    result = CliRunner().invoke(cli, ["feedback", *args], env=env)
    assert result.exit_code == 2, result.output  # a usage error, naming the argument and the reason
    assert f"Invalid value for {param}" in result.output and reason in result.output
    assert _stored(env) == []


def test_the_operator_is_stored_trimmed(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["feedback", "C-1", "NOK", "--operator", "  anna  ", "--comment", "edge"], env=env)
    assert result.exit_code == 0, result.output
    assert "C-1 is NOK according to anna" in result.output
    assert _stored(env) == [("C-1", "anna", "edge")]
