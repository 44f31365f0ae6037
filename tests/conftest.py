"""Shared fixtures: one PostgreSQL database and one MQTT topic prefix per test session, removed afterwards.

Integration tests need the real services. When none is found they are skipped, except with
``CI=true``, where a missing service fails the run: a green CI must mean the integration tests ran.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from infra import in_ci as _in_ci
from infra import mosquitto_server, postgres_server

# Nothing in a test run may reach the network for models, fonts or telemetry.
os.environ.setdefault("YOLO_OFFLINE", "True")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

SESSION_TAG = uuid.uuid4().hex[:8]
OUTPUT_DIR = Path(__file__).parent / "output"


def _missing(what: str) -> None:
    message = f"{what} not reachable (see tests/infra.py for where it is looked for)"
    if _in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """URL of a PostgreSQL server where the session may create and drop databases."""
    with postgres_server() as found:
        if found is None:
            _missing("PostgreSQL")
        yield found.url


def _with_database(admin_url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    from services.config import load_settings

    url = make_url(load_settings(database_url=admin_url).database_url)
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_database_factory(pg_admin_url: str) -> Iterator[Callable[[], str]]:
    """Creates fresh, empty databases on demand; every one is dropped when the session ends."""
    from sqlalchemy import create_engine, text

    from services.config import load_settings

    admin = create_engine(load_settings(database_url=pg_admin_url).database_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def make() -> str:
        name = f"coilguard_test_{SESSION_TAG}_{len(created)}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return _with_database(pg_admin_url, name)

    yield make
    with admin.connect() as conn:
        for name in created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url(pg_database_factory: Callable[[], str]) -> str:
    """The session's own PostgreSQL database, migrated to the newest schema."""
    from services.db.migrate import upgrade

    url = pg_database_factory()
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def mqtt_url() -> Iterator[str]:
    with mosquitto_server() as found:
        if found is None:
            _missing("Mosquitto")
        yield found.url


@pytest.fixture(scope="session")
def topic_prefix(mqtt_url: str) -> Iterator[str]:
    """A topic prefix of this session's own; retained messages under it are cleared at the end."""
    prefix = f"cgtest-{SESSION_TAG}"
    yield prefix
    from services.mqtt.client import clear_retained

    clear_retained(mqtt_url, prefix)


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Where tests leave artifacts a person may want to look at (screenshots, plots)."""
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR
