"""``coilguard up``'s AssessCoils thread rides out outages: a database that is not there (yet) while it
waits for the first model, and a broker that refuses the worker, are logged and tried again; the thread
never ends for good while the API and the scheduler of the same process keep running without it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import OperationalError

from services import up
from services.config import load_settings
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.models import Model


class FlakyWorker:
    """Stands in for AssessWorker: the first run cannot reach the broker, the second serves until stopped."""

    runs = 0

    def __init__(self, *_: object, **__: object) -> None:
        self.stopping = threading.Event()

    def run(self) -> None:
        FlakyWorker.runs += 1
        if FlakyWorker.runs == 1:
            raise ConnectionError("MQTT broker mqtt://127.0.0.1:1 unreachable")
        self.stopping.wait()

    def stop(self) -> None:
        self.stopping.set()


def _until(check: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _logged(caplog: pytest.LogCaptureFixture, error: type[BaseException]) -> bool:
    return any(r.exc_info and issubclass(r.exc_info[0], error) for r in caplog.records)


def test_the_assess_thread_retries_the_database_and_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(up, "AssessWorker", FlakyWorker)
    monkeypatch.setattr(up, "MODEL_POLL_S", 0.02)
    monkeypatch.setattr(up, "RETRY_S", 0.02)
    FlakyWorker.runs = 0
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    engine = make_engine(url)  # not migrated yet: the registry raises OperationalError (no such table)
    said: list[str] = []
    caplog.set_level(logging.ERROR, logger="services.up")
    assess = up.AssessWhenModels(load_settings(_env_file=None, database_url=url), engine, said.append).start()
    try:
        _until(lambda: _logged(caplog, OperationalError))
        upgrade(url)
        _until(lambda: said == [up.NO_MODELS])
        with engine.begin() as conn:
            conn.execute(insert(Model.__table__).values(name="cnn", kind="cnn", version=1, status="active"))
        _until(lambda: FlakyWorker.runs == 2)  # the broker's refusal was retried too
        assert assess._thread.is_alive()
        assert _logged(caplog, ConnectionError)
    finally:
        assess.stop()
        engine.dispose()
    assert not assess._thread.is_alive()
