"""The periodic jobs dispose of the engine they made for one run (the scheduler calls them every few
minutes: undisposed engines left their idle connections open on the server until garbage collection)
and leave an engine the caller handed them alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from services.config import Settings, load_settings
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.drift import run_drift
from services.jobs import run_retrain, run_score

JOBS: dict[str, Callable[..., object]] = {
    "score": run_score,
    "retrain": lambda settings, engine=None: run_retrain(settings),
    "drift": lambda settings, engine=None: run_drift(settings, engine=engine),
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    return load_settings(
        _env_file=None, database_url=url, model_dir=tmp_path / "models", report_dir=tmp_path / "reports"
    )


@pytest.fixture
def disposed(monkeypatch: pytest.MonkeyPatch) -> list[Engine]:
    """Every engine disposed of from now on."""
    seen: list[Engine] = []
    dispose = Engine.dispose

    def spy(self: Engine, close: bool = True) -> None:
        seen.append(self)
        dispose(self, close)

    monkeypatch.setattr(Engine, "dispose", spy)
    return seen


@pytest.mark.parametrize("job", JOBS)
def test_a_job_disposes_of_the_engine_it_made(job: str, settings: Settings, disposed: list[Engine]) -> None:
    JOBS[job](settings)
    assert len(disposed) == 1 and str(disposed[0].url) == settings.database_url


@pytest.mark.parametrize("job", ["score", "drift"])  # run_retrain takes no engine
def test_a_job_leaves_the_callers_engine_alone(job: str, settings: Settings, disposed: list[Engine]) -> None:
    engine = make_engine(settings.database_url)
    JOBS[job](settings, engine)
    assert disposed == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    engine.dispose()


def test_a_wait_for_a_pooled_connection_is_bounded_like_a_connect_and_a_pool_without_one_still_builds(
    tmp_path: Path,
) -> None:
    """A worker waiting for a pooled connection (the API sharing its engine in `coilguard up`) must see a stop
    within a pod's grace period; a NullPool (the migrations') takes no such setting and must still be made."""
    from sqlalchemy.pool import NullPool

    from services.db.engine import PG_CONNECT_TIMEOUT_S, make_engine

    url = "postgresql+psycopg://coilguard@127.0.0.1/coilguard"  # nothing connects
    assert make_engine(url).pool.timeout() == PG_CONNECT_TIMEOUT_S
    assert isinstance(make_engine(url, poolclass=NullPool).pool, NullPool)
    # `coilguard up` on its embedded default, a SQLite file, shares one engine between the API and the worker too
    assert make_engine(f"sqlite:///{tmp_path / 'cg.db'}").pool.timeout() == PG_CONNECT_TIMEOUT_S
    assert make_engine("sqlite://").dialect.name == "sqlite"  # in memory: a pool without a wait, still made
