"""A running AssessCoils on the real PostgreSQL and Mosquitto, for the integration tests."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from sqlalchemy import Engine, func, select

from ml.assessors.base import Assessor
from ml.dataset import CoilDataset
from services.config import Settings, load_settings
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.models import Assessment, Coil, Model
from services.db.repositories import SqlModelRegistry
from services.mqtt.client import Inbound, MqttClient, forget_session
from services.workers.assess import AssessWorker
from workflows.ports import ModelRecord
from workflows.topics import Topics
from workflows.training import register


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


@dataclass
class Listener:
    """An ordinary MQTT client on the decision, rejected and model-event topics, as a dashboard would be."""

    decisions: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    model_events: list[dict] = field(default_factory=list)

    def on_message(self, message: Inbound) -> None:
        doc = orjson.loads(message.payload)
        if "/rejected/" in message.topic:
            self.rejected.append(doc)
        elif message.topic.endswith("/events/models"):
            self.model_events.append(doc)
        else:
            self.decisions.append(doc)


@dataclass
class AssessEnv:
    settings: Settings
    engine: Engine
    topics: Topics
    registry: SqlModelRegistry
    publisher: MqttClient
    listener: Listener
    client_id: str
    _threads: dict[int, threading.Thread] = field(default_factory=dict)

    def register(self, assessor: Assessor, status: str = "active", dataset: CoilDataset | None = None) -> ModelRecord:
        return register(assessor, self.registry, self.settings.model_dir, status=status, dataset=dataset)

    def count(self, column=Coil.coil_id, where=None) -> int:
        query = select(func.count(column))
        if where is not None:
            query = query.where(where)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def coils(self) -> int:
        return self.count()

    def votes_per_coil(self) -> dict[str, list[tuple[str, int]]]:
        query = (
            select(Assessment.coil_id, Model.name, Model.version)
            .join(Model, Model.id == Assessment.model_id)
            .order_by(Assessment.coil_id, Model.name)
        )
        out: dict[str, list[tuple[str, int]]] = {}
        with self.engine.connect() as conn:
            for coil_id, name, version in conn.execute(query):
                out.setdefault(coil_id, []).append((name, version))
        return out

    @contextlib.contextmanager
    def worker(
        self, client_id: str | None = None, mqtt_url: str | None = None, ready: bool = True, **kwargs: object
    ) -> Iterator[AssessWorker]:
        """A worker on its own thread, stopped on exit; ``mqtt_url``: reach the broker another way (a proxy);
        ``ready=False``: yield it once subscribed, before it has an ensemble to serve."""
        settings = self.settings.model_copy(update={"mqtt_url": mqtt_url}) if mqtt_url else self.settings
        worker = AssessWorker(settings, engine=self.engine, client_id=client_id or self.client_id, **kwargs)
        thread = threading.Thread(target=worker.run, name="assess-worker", daemon=True)
        self._threads[id(worker)] = thread
        thread.start()
        started = worker.ready if ready else worker.subscribed
        assert started.wait(60), "worker did not start"
        try:
            yield worker
        finally:
            worker.stop()
            thread.join(30)
            assert not thread.is_alive(), "worker did not stop"

    def running(self, worker: AssessWorker) -> bool:
        return self._threads[id(worker)].is_alive()

    def env(self, worker: bool = True) -> dict[str, str]:
        """Environment for a `coilguard …` subprocess with the same settings (``worker``: as this worker)."""
        env = {
            "COILGUARD_DATABASE_URL": self.settings.database_url,
            "COILGUARD_MQTT_URL": self.settings.mqtt_url,
            "COILGUARD_MQTT_TOPIC_PREFIX": self.settings.mqtt_topic_prefix,
            "COILGUARD_MODEL_DIR": str(self.settings.model_dir),
            "COILGUARD_MQTT_CLIENT_ID": self.client_id,
            "COILGUARD_BATCH_WAIT": str(self.settings.batch_wait.total_seconds()),
        }
        if not worker:
            del env["COILGUARD_MQTT_CLIENT_ID"]
        return {**os.environ, **env}


@contextlib.contextmanager
def assess_env(
    database_url: str, mqtt_url: str, prefix: str, model_dir: Path, **overrides: object
) -> Iterator[AssessEnv]:
    upgrade(database_url)
    settings = load_settings(
        _env_file=None,
        database_url=database_url,
        mqtt_url=mqtt_url,
        mqtt_topic_prefix=prefix,
        model_dir=model_dir,
        **overrides,
    )
    engine = make_engine(settings.database_url)
    topics = Topics(prefix)
    listener = Listener()
    client_id = f"cg-test-assess-{uuid.uuid4().hex[:8]}"
    with MqttClient(mqtt_url, on_message=listener.on_message) as sub, MqttClient(mqtt_url) as pub:
        sub.subscribe(topics.all_decisions)
        sub.subscribe(topics.all_rejected)
        sub.subscribe(topics.model_events)
        time.sleep(0.2)
        try:
            yield AssessEnv(settings, engine, topics, SqlModelRegistry(engine), pub, listener, client_id)
        finally:
            forget_session(mqtt_url, client_id)
            engine.dispose()
