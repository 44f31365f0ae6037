"""``coilguard up``'s AssessCoils thread rides out outages: a database that is not there (yet) and a broker
that refuses the worker are logged and tried again; the thread never ends for good while the API and the
scheduler of the same process keep running without it. It starts the worker before any model is
registered: the worker waits for one itself, subscribed, so that no coil of a fresh install is lost."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from services import up
from services.config import load_settings
from services.db.engine import make_engine
from services.db.repositories import SqlModelRegistry


class FlakyWorker:
    """Stands in for AssessWorker: the first run finds no database, the second cannot reach the broker, the
    third serves until stopped."""

    runs = 0

    def __init__(self, *_: object, engine: object, **__: object) -> None:
        self.engine = engine
        self.stopping = threading.Event()

    def run(self) -> None:
        FlakyWorker.runs += 1
        if FlakyWorker.runs == 1:
            SqlModelRegistry(self.engine).active_models()  # not migrated: OperationalError (no such table)
        if FlakyWorker.runs == 2:
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
    monkeypatch.setattr(up, "RETRY_S", 0.02)
    FlakyWorker.runs = 0
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    engine = make_engine(url)  # never migrated, and no model registered
    caplog.set_level(logging.ERROR, logger="services.up")
    assess = up.AssessThread(load_settings(_env_file=None, database_url=url), engine).start()
    try:
        _until(lambda: FlakyWorker.runs == 3)  # the worker runs without a model: it waits for one itself
        assert assess._thread.is_alive()
        assert _logged(caplog, OperationalError) and _logged(caplog, ConnectionError)
    finally:
        assess.stop()
        engine.dispose()
    assert not assess._thread.is_alive()
