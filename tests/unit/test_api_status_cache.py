"""``/status`` reuses its broker check for a while: polling it opens no MQTT connection per request, and
a broker that is away (a 3 s connect timeout) cannot hold one API thread per request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api import create_app, system
from services.api.deps import Cached
from services.config import load_settings
from services.db import migrate
from services.db.engine import make_engine


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_answer_is_reused_until_it_expires() -> None:
    clock, calls = Clock(), []
    cached: Cached[int] = Cached(10, clock=clock)

    def compute() -> int:
        calls.append(clock.now)
        return len(calls)

    assert [cached.get(compute), cached.get(compute)] == [1, 1]
    clock.now += 9.9
    assert cached.get(compute) == 1
    clock.now += 0.1
    assert cached.get(compute) == 2 and calls == [100.0, 110.0]


def test_while_one_caller_refreshes_the_others_get_the_previous_answer() -> None:
    clock = Clock()
    cached: Cached[str] = Cached(10, clock=clock)
    assert cached.get(lambda: "old") == "old"
    clock.now += 11
    started, release = threading.Event(), threading.Event()

    def slow() -> str:  # a broker that is away: the connect waits for its timeout
        started.set()
        release.wait(10)
        return "new"

    answers: list[str] = []
    refresher = threading.Thread(target=lambda: answers.append(cached.get(slow)))
    refresher.start()
    assert started.wait(10)
    assert cached.get(lambda: "never asked") == "old"  # at once, without a second check
    release.set()
    refresher.join(10)
    assert answers == ["new"] and cached.get(lambda: "never asked") == "new"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path / 'coilguard.db'}"
    migrate.upgrade(url)
    settings = load_settings(_env_file=None, database_url=url, mqtt_url="mqtt://127.0.0.1:1")
    engine = make_engine(url)
    with TestClient(create_app(settings, engine, heartbeat=False)) as client:
        yield client
    engine.dispose()


def test_status_polled_twice_connects_to_the_broker_once(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    connects: list[str] = []

    def broker(settings: object) -> str:
        connects.append("connect")
        raise ConnectionRefusedError("broker unreachable")

    monkeypatch.setattr(system, "_broker", broker)
    first, second = client.get("/status").json(), client.get("/status").json()
    assert connects == ["connect"]
    assert first["broker"] == second["broker"] and not first["broker"]["ok"]
    assert "unreachable" in first["broker"]["detail"]
