"""Timestamps that SQLite fills itself compare right with the ones SQLAlchemy binds (migration 0006).

SQLite compares timestamps as text. ``CURRENT_TIMESTAMP`` wrote ``2026-12-06 23:20:00`` where
SQLAlchemy binds ``2026-12-06 23:20:00.000000``: coils inserted by plain SQL sorted before their own
instant, so ``GET /coils`` paging returned the same coil forever and ``since`` left the boundary row out.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import migrated_engine
from sqlalchemy import Engine, func, select, text

from services.api import create_app
from services.config import load_settings
from services.db.models import Coil

# SQLAlchemy's SQLite DateTime: naive, microseconds always written.
SQLALCHEMY_FORM = (
    "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]"
)
PLAIN_SQL_COILS = "INSERT INTO coils (coil_id, line, matrix) VALUES ('C-1', 'galv-1', x'00'), ('C-2', 'galv-1', x'00'),"
PLAIN_SQL_COILS += " ('C-3', 'galv-1', x'00')"  # one statement: one instant for all three
MAX_PAGES = 10


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'coilguard.db'}"


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    with migrated_engine(url) as engine:
        yield engine


@pytest.fixture
def client(url: str, engine: Engine) -> Iterator[TestClient]:
    settings = load_settings(_env_file=None, database_url=url, api_token="tok")
    with TestClient(create_app(settings, engine, heartbeat=False)) as client:
        yield client


def page_through(client: TestClient, **params: object) -> list[str]:
    """Every coil id ``GET /coils`` hands out one at a time, following ``next_cursor`` (at most MAX_PAGES pages)."""
    seen: list[str] = []
    cursor = None
    for _ in range(MAX_PAGES):
        page = client.get("/coils", params={"limit": 1, **params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        seen += [c["coil_id"] for c in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError(f"paging did not end after {MAX_PAGES} pages: {seen}")


def test_a_default_timestamp_has_the_form_sqlalchemy_binds(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(PLAIN_SQL_COILS))
        conn.execute(text("INSERT INTO feedback (coil_id, label, operator) VALUES ('C-1', 'NOK', 'anna')"))
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT received_at FROM coils WHERE coil_id = 'C-1'")).scalar_one()
        given = conn.execute(text("SELECT created_at FROM feedback")).scalar_one()
        forms = [
            conn.execute(text("SELECT :v GLOB :f"), {"v": v, "f": SQLALCHEMY_FORM}).scalar() for v in (stored, given)
        ]
        # the same instant bound by SQLAlchemy (an aware UTC datetime) finds the rows: the texts are equal
        at = datetime.fromisoformat(stored).replace(tzinfo=UTC)
        found = conn.execute(select(func.count()).where(Coil.received_at == at)).scalar_one()
    assert forms == [1, 1], (stored, given)
    assert found == 3


def test_paging_one_by_one_through_coils_inserted_by_plain_sql_ends(engine: Engine, client: TestClient) -> None:
    with engine.begin() as conn:
        conn.execute(text(PLAIN_SQL_COILS))
    assert page_through(client) == ["C-3", "C-2", "C-1"]  # newest first, then coil id; each once
    assert page_through(client, line="galv-1") == ["C-3", "C-2", "C-1"]


def test_since_keeps_the_coil_received_at_that_instant(engine: Engine, client: TestClient) -> None:
    with engine.begin() as conn:
        conn.execute(text(PLAIN_SQL_COILS))
    (newest,) = client.get("/coils", params={"limit": 1}).json()["items"]
    since = client.get("/coils", params={"since": newest["received_at"]}).json()["items"]
    assert [c["coil_id"] for c in since] == ["C-3", "C-2", "C-1"]
