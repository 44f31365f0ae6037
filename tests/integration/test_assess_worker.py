"""AssessCoils on real PostgreSQL + Mosquitto: every coil decided exactly once, whatever happens."""

from __future__ import annotations

import base64
import contextlib
import itertools
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from assess_env import AssessEnv, assess_env, wait_for
from sqlalchemy import func, select, text
from tcp_proxy import TcpProxy

from ml.assessors.base import Assessor
from ml.assessors.registry import create
from ml.sim import LineConfig, LineSimulator
from services.db.engine import make_engine
from services.db.models import Assessment, Coil, Worker
from services.line import publish_coils
from services.metrics import METRICS
from services.workers import assess as assess_module
from services.workers.assess import AssessWorker, WorkerFailed
from workflows.messages import ModelEvent, dumps, encode_coil_message
from workflows.topics import Topics
from workflows.training import resolve_artifact

Serving = Callable[[str], contextlib.AbstractContextManager[AssessEnv]]  # a database URL → an environment on it


@pytest.fixture(scope="module")
def trained_cnns() -> list[Assessor]:
    """Two quickly trained CNN versions (different seeds) to serve and to promote."""
    data = LineSimulator(LineConfig(seed=101, id_prefix="TRAIN")).dataset(300)
    models = []
    for seed in (1, 2):
        cnn = create("cnn", {"epochs": 1, "batch_size": 64, "seed": seed, "width": 4})
        cnn.fit(data, device="cpu")
        models.append(cnn)
    return models


@pytest.fixture
def serving(
    request: pytest.FixtureRequest, mqtt_url: str, topic_prefix: str, tmp_path: Path, trained_cnns: list[Assessor]
) -> Serving:
    """An environment on the database at a URL, under this test's topic prefix, the first CNN version serving."""

    @contextlib.contextmanager
    def at(database_url: str) -> Iterator[AssessEnv]:
        with assess_env(database_url, mqtt_url, f"{topic_prefix}/{request.node.name}", tmp_path) as env:
            env.register(trained_cnns[0])
            yield env

    return at


@pytest.fixture
def env(serving: Serving, pg_database_factory: Callable[[], str]) -> Iterator[AssessEnv]:
    with serving(pg_database_factory()) as env:
        yield env


@pytest.fixture
def broker_proxy(mqtt_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A network between a worker and the broker that a test can cut or stall, and the MQTT URL through it."""
    proxy, via_proxy = TcpProxy.in_front_of(mqtt_url, 1883)
    yield proxy, via_proxy
    proxy.cut()


@pytest.fixture
def db_proxy(serving: Serving, pg_database_factory: Callable[[], str]) -> Iterator[tuple[TcpProxy, AssessEnv]]:
    """An environment whose database is reached through a proxy a test can cut, stall and restore (and must
    restore before it ends)."""
    proxy, via_proxy = TcpProxy.in_front_of(pg_database_factory(), 5432)
    try:
        with serving(via_proxy) as env:
            yield proxy, env
    finally:
        proxy.cut()


def _coils(n: int, prefix: str, seed: int = 5):
    return list(itertools.islice(LineSimulator(LineConfig(seed=seed, id_prefix=prefix)).stream(), n))


def test_a_thousand_coils_are_decided_once_and_republishing_changes_nothing(env: AssessEnv) -> None:
    coils = _coils(1000, "K")
    with env.worker():
        publish_coils(env.publisher, env.topics, coils, rate=None)
        assert wait_for(lambda: len(env.listener.decisions) >= 1000, timeout=120), len(env.listener.decisions)
        assert env.coils() == 1000
        assert env.count(Assessment.id) == 1000  # one active model, one vote each
        before = {d["coil_id"]: d["decision"] for d in env.listener.decisions}
        assert len(before) == 1000 and set(before) == {c.coil_id for c in coils}

        publish_coils(env.publisher, env.topics, coils[:100], rate=None)
        env.publisher.flush()
        time.sleep(2.0)
        assert env.coils() == 1000 and env.count(Assessment.id) == 1000
        assert len(env.listener.decisions) == 1000, "an already announced coil is not announced again"
    with env.engine.connect() as conn:
        stored = dict(conn.execute(Coil.__table__.select().with_only_columns(Coil.coil_id, Coil.status)).all())
        unmarked = conn.execute(select(func.count()).where(Coil.published_at.is_(None))).scalar_one()
    assert stored == before
    assert unmarked == 0, "every announced decision is marked published (the last batch's too)"
    votes = env.votes_per_coil()
    assert all(v == [("cnn", 1)] for v in votes.values())


def test_sigkill_mid_stream_then_restart_decides_every_coil_exactly_once(env: AssessEnv, tmp_path: Path) -> None:
    coils = _coils(1000, "S")
    environment = env.env()
    log = tmp_path / "assess.log"

    def start() -> subprocess.Popen:
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "services.cli", "assess"], env=environment, stderr=out)
        assert wait_for(lambda: b"assess worker ready" in log.read_bytes()[offset:], timeout=90), log.read_text()
        return proc

    worker = start()
    try:
        publish_coils(env.publisher, env.topics, coils, rate=400)
        assert wait_for(lambda: env.coils() >= 200, timeout=60)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        killed_at = env.coils()
        assert killed_at < 1000, "the worker must be killed mid-stream for this test to mean anything"
        worker = start()
        assert wait_for(lambda: env.coils() == 1000, timeout=120), env.coils()
        time.sleep(1.0)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
    assert env.coils() == 1000 and env.count(Assessment.id) == 1000
    assert {d["coil_id"] for d in env.listener.decisions} == {c.coil_id for c in coils}
    assert worker.returncode == 0, log.read_text()[-3000:]


MALFORMED: dict[str, Callable[[int], bytes]] = {
    "bad json": lambda i: b'{"schema": 1, "coil_id": "M-%d", ' % i,
    "wrong shape": lambda i: orjson.dumps(
        {
            "schema": 1,
            "coil_id": f"M-{i}",
            "line": "galv-1",
            "produced_at": "2026-11-23T10:00:00Z",
            "thickness": [[1.0] * 18] * 20,
        }
    ),
    "infinite": lambda i: orjson.dumps(
        {
            "schema": 1,
            "coil_id": f"M-{i}",
            "line": "galv-1",
            "produced_at": "2026-11-23T10:00:00Z",
            "thickness_b64": base64.b64encode(np.full((264, 18), np.inf, "<f4").tobytes()).decode(),
        }
    ),
    "missing id": lambda i: orjson.dumps(
        {"schema": 1, "line": "galv-1", "produced_at": "2026-11-23T10:00:00Z", "thickness": [[140.0] * 18] * 264}
    ),
    "bad id": lambda i: orjson.dumps(
        {
            "schema": 1,
            "coil_id": f"M {i}/x",
            "line": "galv-1",
            "produced_at": "2026-11-23T10:00:00Z",
            "thickness": [[140.0] * 18] * 264,
        }
    ),
    "string readings": lambda i: orjson.dumps(
        {
            "schema": 1,
            "coil_id": f"M-{i}",
            "line": "galv-1",
            "produced_at": "2026-11-23T10:00:00Z",
            "thickness": [["140"] * 18] * 264,
        }
    ),
    "wrong schema": lambda i: orjson.dumps(
        {
            "schema": 7,
            "coil_id": f"M-{i}",
            "line": "galv-1",
            "produced_at": "2026-11-23T10:00:00Z",
            "thickness": [[140.0] * 18] * 264,
        }
    ),
    "not an object": lambda i: b"[1, 2, 3]",
}


def test_malformed_messages_are_rejected_with_reasons_and_the_stream_goes_on(env: AssessEnv) -> None:
    valid = _coils(400, "V", seed=9)
    kinds = list(MALFORMED)
    oversize = b'{"schema": 1, "pad": "' + b"x" * (1 << 20) + b'"}'
    with env.worker() as worker:
        sent_bad = 0
        started = time.perf_counter()
        for i, coil in enumerate(valid):
            # offered at 350 messages/s: a burst far beyond the worker's pace would overflow the broker's
            # default queue (Mosquitto drops QoS 1 beyond max_queued_messages=1000; see docs/operations.md)
            delay = started + i * 4 / 350 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            publish_coils(env.publisher, env.topics, [coil])
            for j in range(3 if i < 200 else 2):  # 1,000 malformed among 400 valid
                n = i * 3 + j
                payload = oversize if n % 250 == 0 else MALFORMED[kinds[n % len(kinds)]](n)
                env.publisher.publish(env.topics.sensors("galv-1"), payload)
                sent_bad += 1
        env.publisher.flush()
        assert sent_bad == 1000
        done = wait_for(lambda: len(env.listener.rejected) >= 1000 and env.coils() >= 400, timeout=120)
        assert done, (len(env.listener.rejected), env.coils(), worker.stats)
        assert worker.ready.is_set() and not worker.stopping.is_set()
    assert env.coils() == 400 and len(env.listener.rejected) == 1000
    assert all(r["reason"] and r["received_at"] and "excerpt" in r for r in env.listener.rejected)
    reasons = {r["reason"].split(":")[0].split(" ")[0] for r in env.listener.rejected}
    assert len(reasons) >= 6, reasons
    assert any("exceeds the limit" in r["reason"] for r in env.listener.rejected)


def test_promotion_mid_stream_switches_versions_without_losing_a_coil(
    env: AssessEnv, trained_cnns: list[Assessor]
) -> None:
    first, second = _coils(300, "P1", seed=21), _coils(300, "P2", seed=22)
    with env.worker() as worker:
        publish_coils(env.publisher, env.topics, first, rate=None)
        assert wait_for(lambda: env.coils() == 300, timeout=60)
        with env.engine.connect() as conn:  # the worker's heartbeat names what it serves
            beat = conn.execute(select(Worker.kind, Worker.info)).one()
        assert beat.kind == "assess" and beat.info["models"] == {"cnn": 1}
        _promote(env, env.register(trained_cnns[1], status="candidate"))
        assert wait_for(lambda: worker.stats.reloads == 1, timeout=30)
        publish_coils(env.publisher, env.topics, second, rate=None)
        assert wait_for(lambda: env.coils() == 600, timeout=60)
    with env.engine.connect() as conn:
        assert conn.execute(select(Worker)).first() is None  # a clean stop removes the heartbeat
    votes = env.votes_per_coil()
    assert {tuple(votes[c.coil_id]) for c in first} == {(("cnn", 1),)}
    assert {tuple(votes[c.coil_id]) for c in second} == {(("cnn", 2),)}
    announced = {d["coil_id"]: d["votes"][0]["version"] for d in env.listener.decisions}
    assert all(announced[c.coil_id] == 2 for c in second) and len(announced) == 600


def test_while_the_database_is_down_nothing_is_dropped_and_the_worker_catches_up(
    db_proxy: tuple[TcpProxy, AssessEnv],
) -> None:
    proxy, env = db_proxy
    first, during = _coils(100, "D1", seed=41), _coils(150, "D2", seed=42)
    with env.worker() as worker:
        publish_coils(env.publisher, env.topics, first)
        assert wait_for(lambda: env.coils() == 100, timeout=60)
        proxy.cut()
        publish_coils(env.publisher, env.topics, during, rate=100)
        time.sleep(3.0)  # the worker is retrying; nothing may be announced or acknowledged meanwhile
        announced = {d["coil_id"] for d in env.listener.decisions}
        assert not announced & {c.coil_id for c in during}
        assert worker.ready.is_set() and not worker.stopping.is_set()
        proxy.restore()
        assert wait_for(lambda: env.coils() == 250, timeout=90), env.coils()
        assert wait_for(lambda: len(env.listener.decisions) >= 250, timeout=30)
    assert env.count(Assessment.id) == 250
    assert {d["coil_id"] for d in env.listener.decisions} == {c.coil_id for c in first + during}


def test_a_stop_during_a_database_outage_ends_the_worker_at_once_and_acknowledges_nothing(
    db_proxy: tuple[TcpProxy, AssessEnv],
    trained_cnns: list[Assessor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGTERM while the database is away, twice: once with a batch waiting between retries (the backoff has
    grown to 8 s) and the database host gone silent (a connection attempt waits out its 10 s timeout), once in
    the middle of loading a promoted version. Either way the worker must end at once, not when the database
    returns or the grace period's SIGKILL comes, and the coils it held go to the next worker."""
    proxy, env = db_proxy
    first, held = _coils(5, "S0", seed=43), _coils(20, "S1", seed=44)
    with env.worker() as worker:
        publish_coils(env.publisher, env.topics, first)
        assert wait_for(lambda: env.coils() == 5, timeout=60)  # serving: past the start-up's own retries
        proxy.cut()
        publish_coils(env.publisher, env.topics, held)
        assert wait_for(lambda: "look up decided coils" in caplog.text, timeout=30)
        time.sleep(9.0)  # attempts at 0, 0.5, 1.5, 3.5 and 7.5 s: the worker is now in its 8 s wait
        proxy.restore()
        proxy.stall()  # connections are taken and never answered, as by a host that has gone
        worker.stop()
        # not one more attempt (10 s), nor the heartbeat's, nor the heartbeat row's removal (5 s join + 10 s)
        assert wait_for(lambda: not env.running(worker), timeout=5), "the stop waited for the database"
    proxy.cut()
    proxy.resume()
    proxy.restore()

    candidate = env.register(trained_cnns[1], status="candidate")
    with env.worker() as worker:
        assert wait_for(lambda: env.coils() == 25, timeout=60), env.coils()  # the held coils, redelivered

        def load_across_an_outage():  # the registry was read; the database goes before the versions load
            proxy.cut()
            return original()

        original = worker.loader.load
        monkeypatch.setattr(worker.loader, "load", load_across_an_outage)
        _promote(env, candidate)
        assert wait_for(lambda: proxy._server is None, timeout=30), "the promotion was not seen"
        time.sleep(2.0)
        worker.stop()
        assert wait_for(lambda: not env.running(worker), timeout=5), "the stop waited for the database"
        assert worker.stats.reloads == 0 and worker.stats.refused_reloads == 0
    proxy.restore()


@pytest.mark.parametrize("broker", ["refusing", "silent"])
def test_a_worker_stopped_before_the_broker_answers_ends_at_once(
    env: AssessEnv, broker_proxy: tuple[TcpProxy, str], broker: str
) -> None:
    """SIGTERM while the broker is down at start-up: refusing connections (retried with backoff), or taking them
    and never answering (waiting for its CONNACK). Either way the worker ends at once instead of trying on for
    the minute its connect allows, the pod's whole grace period."""
    proxy, via_proxy = broker_proxy
    if broker == "refusing":
        proxy.cut()
    else:
        proxy.stall()
    worker = AssessWorker(env.settings.model_copy(update={"mqtt_url": via_proxy}), engine=env.engine)
    ended: list[object] = []
    thread = threading.Thread(target=lambda: ended.append(worker.run()), daemon=True)
    thread.start()
    time.sleep(3.0)
    assert thread.is_alive() and not worker.subscribed.is_set()
    worker.stop()
    thread.join(5)
    assert not thread.is_alive(), "the stop waited for the broker"
    assert ended == [worker.stats]  # a clean end, not a ConnectionError
    assert not worker.stats.session_removed  # what `coilguard assess --retire` reports


def test_a_database_gone_read_only_holds_the_coils_back_and_rejects_none(
    env: AssessEnv, pg_admin_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failover the worker's new connections can reach a read-only server: each write is refused ("cannot
    execute INSERT in a read-only transaction", psycopg's InternalError), which is the database's state, not an
    outage and not a bad coil. No coil may be rejected as "could not be stored" for it: the worker keeps the batch
    unacknowledged, tries again, and writes it once the server takes writes."""
    name = env.engine.url.database
    admin = make_engine(pg_admin_url)

    def read_only(on: bool) -> None:
        change = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        with admin.begin() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" {change}'))
        if on:  # the setting holds for new sessions: end the open ones (on the way back the worker must cope)
            with admin.begin() as conn:
                conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": name}
                )

    first, during = _coils(10, "RO1", seed=45), _coils(20, "RO2", seed=46)
    try:
        with env.worker():
            publish_coils(env.publisher, env.topics, first)
            assert wait_for(lambda: env.coils() == 10, timeout=60)
            read_only(True)
            publish_coils(env.publisher, env.topics, during)
            assert wait_for(lambda: "read-only transaction" in caplog.text, timeout=30)  # refused, and retried
            time.sleep(1.0)
            assert env.coils() == 10 and not env.listener.rejected
            read_only(False)
            assert wait_for(lambda: env.coils() == 30, timeout=60), env.coils()
            assert wait_for(lambda: len(env.listener.decisions) >= 30, timeout=30)
    finally:
        read_only(False)
        admin.dispose()
    assert not env.listener.rejected
    assert sorted(d["coil_id"] for d in env.listener.decisions) == sorted(c.coil_id for c in first + during)
    assert env.count(Assessment.id) == 30


def test_a_committer_that_fails_stops_the_worker_with_an_error_and_acknowledges_nothing_more(env: AssessEnv) -> None:
    """Anything unforeseen in the committer (here the batch callback raising) must end the run with an error, for
    the pod to be restarted, not leave the worker thread blocked on a full queue while /metrics answers."""
    failures: list[BaseException] = []

    def fail(_result) -> None:
        raise RuntimeError("unforeseen")

    worker = AssessWorker(env.settings, engine=env.engine, client_id=env.client_id, on_batch=fail)

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert worker.ready.wait(60)
    publish_coils(env.publisher, env.topics, _coils(200, "CF", seed=47), rate=400)
    thread.join(60)
    assert not thread.is_alive(), "the worker hung"
    assert len(failures) == 1 and isinstance(failures[0], WorkerFailed)
    assert isinstance(failures[0].__cause__, RuntimeError)
    assert env.coils() < 200  # it stopped at the first failed batch
    with env.worker():  # the same session, restarted: what was not acknowledged comes back, nothing twice
        assert wait_for(lambda: env.coils() == 200, timeout=60), env.coils()
        assert wait_for(lambda: len({d["coil_id"] for d in env.listener.decisions}) == 200, timeout=30)
    assert env.count(Assessment.id) == 200


def test_decisions_the_broker_refuses_are_held_back_while_other_lines_go_on_and_go_out_once_it_takes_them(
    env: AssessEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new line whose decision topic the broker's ACL does not cover: Mosquitto answers each decision with
    PUBACK "Not authorized" (here: topics under $SYS, which it refuses to everyone), and paho counts that as
    published. Taken for announced, those coils were acknowledged and marked, their decisions gone without a
    word. Now they are held back unacknowledged while the other lines' coils go on; a refused rejection is
    counted and does not stop the stream; once the broker takes the topic, every held decision goes out once."""
    real_decisions, real_rejected = Topics.decisions, Topics.rejected

    def refused(real):
        return lambda self, line: f"$SYS/coilguard-test/{line}" if line == "galv-new" else real(self, line)

    monkeypatch.setattr(Topics, "decisions", refused(real_decisions))
    monkeypatch.setattr(Topics, "rejected", refused(real_rejected))
    monkeypatch.setattr(assess_module, "HELD_RETRY_S", 0.5)

    def count(kind: str) -> float:
        return METRICS.publish_refused.labels(kind)._value.get()

    before = count("decision"), count("rejection")
    new_line = list(itertools.islice(LineSimulator(LineConfig(seed=52, id_prefix="NL", line="galv-new")).stream(), 8))
    old_line = _coils(8, "OL", seed=53)
    with env.worker():
        publish_coils(env.publisher, env.topics, [c for pair in zip(new_line, old_line, strict=True) for c in pair])
        env.publisher.publish(env.topics.sensors("galv-new"), b"{not json", qos=1)  # its rejection is refused too
        assert wait_for(lambda: len(env.listener.decisions) == 8, timeout=60), env.listener.decisions
        assert wait_for(lambda: count("rejection") - before[1] == 1, timeout=30)
        time.sleep(1.5)  # offered again, refused again
        assert {d["coil_id"] for d in env.listener.decisions} == {c.coil_id for c in old_line}
        assert count("decision") - before[0] == 8 and env.coils() == 16
        monkeypatch.setattr(Topics, "decisions", real_decisions)  # the ACL mended: no restart needed
        assert wait_for(lambda: len(env.listener.decisions) == 16, timeout=30), len(env.listener.decisions)
        assert wait_for(lambda: env.count(Coil.coil_id, Coil.published_at.is_not(None)) == 16, timeout=30)
    assert sorted(d["coil_id"] for d in env.listener.decisions) == sorted(c.coil_id for c in new_line + old_line)
    assert env.count(Assessment.id) == 16
    with env.worker():  # every message was acknowledged: nothing comes back, nothing is announced again
        time.sleep(2.0)
    assert len(env.listener.decisions) == 16


def test_coils_sent_at_qos_0_are_taken_and_counted_and_dropped_only_while_the_worker_is_behind(env: AssessEnv) -> None:
    """QoS 0 escapes the broker's receive maximum, so a gateway sending it could grow the worker's backlog
    without bound during an outage. Taken while the worker keeps up; dropped past the high-water mark (here 0:
    the worker counts as behind), each counted by outcome, while QoS 1 coils are never dropped."""

    def qos0(outcome: str) -> float:
        return METRICS.coils_qos0.labels(outcome)._value.get()

    def send(coils: list, qos: int) -> None:
        for coil in coils:
            payload = encode_coil_message(coil.coil_id, coil.line, coil.produced_at, coil.thickness)
            env.publisher.publish(env.topics.sensors(coil.line), payload, qos=qos)
        assert env.publisher.flush(10)

    taken, dropped = qos0("taken"), qos0("dropped")
    with env.worker() as worker:
        assert worker.qos0_high_water == 256  # the receive maximum: QoS 1 and 0 together stay within twice it
        send(_coils(3, "Q0A", seed=49), qos=0)
        assert wait_for(lambda: env.coils() == 3, timeout=60)
        assert qos0("taken") - taken == 3
        worker.qos0_high_water = 0
        send(_coils(4, "Q0B", seed=50), qos=0)
        send(_coils(2, "Q1", seed=51), qos=1)
        assert wait_for(lambda: env.coils() == 5, timeout=60)
        assert wait_for(lambda: qos0("dropped") - dropped == 4, timeout=10)
    assert qos0("taken") - taken == 3


def test_a_worker_whose_mqtt_network_thread_ended_is_not_live(env: AssessEnv) -> None:
    """Paho's thread reads the coils and reconnects; if it ends (something inside paho raised), the worker's own
    loops still come round, idle, and nothing but /health/live can get the pod restarted."""
    with env.worker() as worker:
        assert wait_for(worker.ready.is_set, timeout=60)
        assert worker._liveness() is None, worker._liveness()
        worker.client._client.loop_stop()  # the thread ends as it would on an error inside paho
        assert worker._liveness() == "the MQTT network thread has ended: no coil arrives and no reconnect is tried"
        # ended on purpose (the worker failed, and `coilguard up` keeps its probes until it starts the next one):
        # no restart asked for
        worker._disconnect()
        assert worker._liveness() is None, worker._liveness()


def test_decisions_the_broker_never_confirmed_are_announced_after_a_restart(
    env: AssessEnv, broker_proxy: tuple[TcpProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network that drops the worker's packets unnoticed: its decisions never reach the broker, nor do its
    acknowledgements. Stopped so, the worker must not count those coils as announced; restarted, it announces
    every one (and decides none twice). The stop is seen within a second, not after the 30 s it waits before
    saying the broker is silent: a pod's grace period is 30 s too, and SIGKILL would leave its heartbeat row.
    While it waits it stays live: an outage is not a hang, and a restart would not bring the broker back (here
    the waits and the hang limit are shortened, to 0.3 s and 2 s, from 30 s, 5 s and 5 min)."""
    monkeypatch.setattr(assess_module, "CONFIRM_WAIT_S", 0.3)
    monkeypatch.setattr(assess_module, "BEAT_S", 0.3)
    monkeypatch.setattr(assess_module, "LIVE_S", 2.0)
    proxy, via_proxy = broker_proxy
    coils = _coils(5, "U")
    with env.worker(mqtt_url=via_proxy) as worker:  # stopped on leaving, with the network still dropping packets
        proxy.stall()
        publish_coils(env.publisher, env.topics, coils)
        # decided and stored, and announced into the void: the worker waits for the broker's word (and
        # a later batch, when the five came in two, waits behind it)
        assert wait_for(lambda: env.coils() >= 1, timeout=60)
        time.sleep(3.0)
        assert worker._liveness() is None, worker._liveness()
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5.0, "the stop waited out the broker's silence"
    proxy.cut()
    assert not env.listener.decisions
    with env.worker():  # directly connected, same session: the unacknowledged coils come back
        assert wait_for(lambda: len(env.listener.decisions) >= 5, timeout=60), env.listener.decisions
    assert sorted(d["coil_id"] for d in env.listener.decisions) == sorted(c.coil_id for c in coils)
    assert env.count(Assessment.id) == 5  # one vote each: stored once, announced after the restart


def test_a_broker_connection_broken_as_a_batch_is_announced_loses_nothing_and_the_stream_goes_on(
    env: AssessEnv, broker_proxy: tuple[TcpProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks between a batch's commit and its announcement (a broker restart, a network blip):
    the decisions wait in the client, go out after the reconnect, and only then is the batch acknowledged;
    the worker goes on with the coils that come later."""
    proxy, via_proxy = broker_proxy
    first, later = _coils(20, "B1", seed=43), _coils(30, "B2", seed=44)
    with env.worker(mqtt_url=via_proxy) as worker:
        commit, broken = worker.workflow.commit, threading.Event()

        def commit_then_lose_the_broker(*args: object):
            result = commit(*args)
            if not broken.is_set():  # the first batch: announced while the connection is down
                broken.set()
                proxy.cut()
                wait_for(lambda: not worker.client.connected.is_set(), timeout=10)
                threading.Timer(1.0, proxy.restore).start()
            return result

        monkeypatch.setattr(worker.workflow, "commit", commit_then_lose_the_broker)
        publish_coils(env.publisher, env.topics, first)
        assert wait_for(lambda: broken.is_set() and worker.client.connected.is_set(), timeout=60)
        publish_coils(env.publisher, env.topics, later)
        assert wait_for(lambda: env.coils() == 50, timeout=60), env.coils()
        every = {c.coil_id for c in first + later}
        assert wait_for(lambda: {d["coil_id"] for d in env.listener.decisions} == every, timeout=30)
    assert env.count(Assessment.id) == 50  # each decided once (a coil redelivered after the break is not)


def test_a_coil_sent_twice_in_quick_succession_is_announced_once(
    env: AssessEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway's QoS 1 resend arrives before the worker has written that the first decision went out."""
    monkeypatch.setattr(assess_module, "MARK_IDLE_S", 5.0)  # the mark waits for a next batch, or 5 s
    [coil] = _coils(1, "Q")
    with env.worker() as worker:
        publish_coils(env.publisher, env.topics, [coil])
        assert wait_for(lambda: len(env.listener.decisions) == 1, timeout=30)
        publish_coils(env.publisher, env.topics, [coil])
        assert wait_for(lambda: worker.stats.duplicates + worker.stats.republished == 1, timeout=30)
        time.sleep(0.5)
    assert [d["coil_id"] for d in env.listener.decisions] == [coil.coil_id]
    assert worker.stats.duplicates == 1 and worker.stats.republished == 0


def test_a_worker_stopped_while_catching_up_hands_the_backlog_back(env: AssessEnv) -> None:
    """A rolling restart while the worker works through a backlog (after an outage, say). The broker refills the
    worker's inbox as fast as it acknowledges, so draining "until nothing is left" would last until the grace
    period ran out and the pod was killed. It assesses what it had received, stops, and the next worker gets
    the rest, each coil once. (900 coils: a broker on Mosquitto's default limits drops a backlog beyond 1000
    queued messages per client; deploy/mosquitto/mosquitto.conf raises that limit.)"""
    coils = _coils(900, "K")
    with env.worker():  # the worker's session exists: what is published while it is away waits in the broker
        pass
    publish_coils(env.publisher, env.topics, coils)
    # stopped by its first batch: a callback that could only reach the worker once the test thread had it (after
    # the worker was ready) let a loaded machine's worker decide 705 coils first (CI, 2026-12-07)
    worker = AssessWorker(env.settings, engine=env.engine, client_id=env.client_id, on_batch=lambda _: worker.stop())
    thread = threading.Thread(target=worker.run, name="assess-worker", daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the worker did not stop"
    handed_back = len(coils) - env.coils()
    assert handed_back >= 200, f"it drained the backlog instead of stopping ({worker.stats})"
    with env.worker():
        assert wait_for(lambda: env.coils() == 900, timeout=120), env.coils()
    assert env.count(Assessment.id) == 900
    assert {d["coil_id"] for d in env.listener.decisions} == {c.coil_id for c in coils}


def test_a_coil_sent_again_while_its_decision_awaits_the_brokers_word_is_announced_once(
    env: AssessEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's resend arrives after the decision was stored and published, before the broker confirmed
    it: the copy is a duplicate, not a decided coil whose announcement is missing."""
    [coil] = _coils(1, "A")
    with env.worker() as worker:
        flush, copy_voted = worker.client.flush, []

        def flush_once_the_copy_is_voted(timeout: float = 30.0, stop: threading.Event | None = None) -> bool:
            if not copy_voted:  # the first batch: its decision is out, its confirmation not yet in
                publish_coils(env.publisher, env.topics, [coil])
                copy_voted.append(wait_for(lambda: worker._pending.qsize() == 1, timeout=30))  # behind this batch
            return flush(timeout, stop)

        monkeypatch.setattr(worker.client, "flush", flush_once_the_copy_is_voted)
        publish_coils(env.publisher, env.topics, [coil])
        assert wait_for(lambda: worker.stats.duplicates + worker.stats.republished == 1, timeout=30)
        time.sleep(0.5)
    assert copy_voted == [True], "the copy was not voted while the first decision awaited the broker"
    assert [d["coil_id"] for d in env.listener.decisions] == [coil.coil_id]
    assert worker.stats.duplicates == 1 and worker.stats.republished == 0


def test_a_retired_worker_hands_in_its_queued_share_and_nothing_is_stranded(env: AssessEnv) -> None:
    """Two workers share the stream; one stops for good (a scaled-in pod). The broker goes on routing half the
    coils to its session. `coilguard assess --retire` assesses them and removes the session."""
    leaving = f"{env.client_id}-leaving"
    first, later = _coils(40, "R1"), _coils(20, "R2", seed=6)
    with env.worker() as staying:
        with env.worker(client_id=leaving):
            pass  # started, subscribed, stopped: its persistent session stays behind
        publish_coils(env.publisher, env.topics, first)
        assert wait_for(lambda: staying.stats.decided > 0, timeout=30)
        time.sleep(1.0)
        with socket.socket() as taken:  # run by hand in a pod whose own worker serves the metrics port
            taken.bind(("0.0.0.0", 0))
            taken.listen()
            in_the_pod = env.settings.model_copy(update={"metrics_port": taken.getsockname()[1]})
            retired = AssessWorker(in_the_pod, engine=env.engine, client_id=leaving, retire=True).run()
        assert retired.decided > 0 and retired.session_removed  # the stranded share was waiting in the session
        assert wait_for(lambda: env.coils() == 40, timeout=30), env.coils()
        assert staying.stats.decided + retired.decided == 40
        publish_coils(env.publisher, env.topics, later)
        assert wait_for(lambda: env.coils() == 60, timeout=30), env.coils()  # the session is gone
    assert env.count(Assessment.id) == 60
    assert sorted(d["coil_id"] for d in env.listener.decisions) == sorted(c.coil_id for c in first + later)


def test_a_retiring_worker_whose_commits_are_slow_takes_its_whole_share_before_ending_the_session(
    env: AssessEnv,
) -> None:
    """The broker holds back what the receive maximum (256) does not let through until the worker acknowledges.
    A commit slower than the retiring worker's quiet period (3 s), its acknowledgements reaching the broker a
    little late, must not read as "the session is empty": the session would be removed with coils still queued in
    it, and they would be lost."""
    leaving = f"{env.client_id}-slow"
    coils = _coils(700, "RS", seed=48)
    with env.worker() as staying:
        with env.worker(client_id=leaving):
            pass  # its persistent session stays behind and is routed about half the coils
        publish_coils(env.publisher, env.topics, coils)
        assert wait_for(lambda: staying.stats.decided >= 300, timeout=60)
        retiring = AssessWorker(env.settings, engine=env.engine, client_id=leaving, retire=True)
        commit, slow = retiring.workflow.commit, itertools.count()

        def slow_commit(*args, **kwargs):
            if next(slow) < 2:
                time.sleep(4.0)
            return commit(*args, **kwargs)

        ack = retiring.client.ack

        def late_ack(message) -> None:  # a slow link: the broker hears of it half a second later
            threading.Timer(0.5, ack, args=(message,)).start()

        retiring.workflow.commit = slow_commit  # type: ignore[method-assign]
        retiring.client.ack = late_ack  # type: ignore[method-assign]
        retired = retiring.run()
        assert retired.decided > 256  # more than one receive window's worth waited in the session
        assert wait_for(lambda: env.coils() == 700, timeout=30), env.coils()
    assert staying.stats.decided + retired.decided == 700


def test_a_worker_started_before_any_model_waits_subscribed_and_loses_no_coil(
    pg_database_factory: Callable[[], str], mqtt_url: str, topic_prefix: str, tmp_path: Path, trained_cnns: list
) -> None:
    """A fresh install: the worker starts before anybody trained a model. It must neither exit (a restart
    loop, with nobody subscribed meanwhile) nor drop the coils that arrive before the first model. Its probes say
    so: live, not ready, until the model loads (a rollout waits on that); a loop that stops coming round makes it
    not live."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    probe = f"http://127.0.0.1:{port}/health"
    with assess_env(pg_database_factory(), mqtt_url, f"{topic_prefix}/no-model", tmp_path, metrics_port=port) as env:
        coils = _coils(10, "W")
        with env.worker(ready=False) as worker:
            publish_coils(env.publisher, env.topics, coils)
            time.sleep(1.0)
            assert env.running(worker) and not worker.ready.is_set() and env.coils() == 0
            waiting = httpx.get(f"{probe}/ready")
            assert waiting.status_code == 503 and "waiting for the registry's active models" in waiting.text
            assert httpx.get(f"{probe}/live").status_code == 200
            _promote(env, env.register(trained_cnns[0]))
            assert worker.ready.wait(30), "the first model was not picked up"
            assert wait_for(lambda: env.coils() == 10, timeout=30), env.coils()
            assert httpx.get(f"{probe}/ready").text == "ok\n"
            assert "coilguard_coils_assessed_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
            time.sleep(6)  # idle: the committer's loop still comes round, every 5 s
            assert {"assess-worker", "assess-commit"} <= set(worker._beats)
            assert max(time.monotonic() - at for at in worker._beats.values()) < 5.5
            worker._beats["assess-stuck"] = time.monotonic() - 400  # a loop that hung in a call 6 minutes ago
            hung = httpx.get(f"{probe}/live")
            assert hung.status_code == 503 and "in thread assess-stuck" in hung.text, hung.text
            del worker._beats["assess-stuck"]
            assert httpx.get(f"{probe}/live").status_code == 200
        assert sorted(d["coil_id"] for d in env.listener.decisions) == sorted(c.coil_id for c in coils)


def test_a_promoted_version_that_does_not_load_is_refused_and_the_one_serving_goes_on(
    pg_database_factory: Callable[[], str], mqtt_url: str, topic_prefix: str, tmp_path: Path, trained_cnns: list
) -> None:
    """A version whose weights were altered (or half copied) is promoted. The worker refuses it and decides with
    the version it serves; a worker started while only that version is active waits, subscribed, instead of
    exiting in a restart loop; both take the next version that loads."""
    with assess_env(pg_database_factory(), mqtt_url, f"{topic_prefix}/broken", tmp_path) as env:
        env.register(trained_cnns[0])
        first, second, third = (_coils(40, f"T{i}", seed=50 + i) for i in range(3))
        with env.worker() as worker:
            publish_coils(env.publisher, env.topics, first)
            assert wait_for(lambda: env.coils() == 40, timeout=60)
            broken = env.register(trained_cnns[1], status="candidate")
            weights = resolve_artifact(env.settings.model_dir, broken.artifact_uri) / "weights.pt"
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0xFF
            weights.write_bytes(bytes(data))
            _promote(env, broken)
            assert wait_for(lambda: worker.stats.refused_reloads >= 1, timeout=30)
            publish_coils(env.publisher, env.topics, second)
            assert wait_for(lambda: env.coils() == 80, timeout=60)
            assert env.running(worker) and worker.stats.reloads == 0
        with env.worker(ready=False) as fresh:  # only the broken version is active now
            publish_coils(env.publisher, env.topics, third)
            time.sleep(1.0)
            assert env.running(fresh) and not fresh.ready.is_set() and env.coils() == 80
            _promote(env, env.register(trained_cnns[1], status="candidate"))
            assert fresh.ready.wait(30), "the version that loads was not picked up"
            assert wait_for(lambda: env.coils() == 120, timeout=30), env.coils()
    votes = env.votes_per_coil()
    assert {tuple(votes[c.coil_id]) for c in first + second} == {(("cnn", 1),)}
    assert {tuple(votes[c.coil_id]) for c in third} == {(("cnn", 3),)}


def _promote(env: AssessEnv, record) -> None:
    """Make ``record`` the active version and tell the workers, as ReTrain does."""
    env.registry.promote(record.id)
    event = ModelEvent(event="promoted", model=record.name, version=record.version, at=datetime.now(UTC))
    env.publisher.publish(env.topics.model_events, dumps(event))


def test_the_signal_handler_does_not_wait_for_a_lock_the_interrupted_worker_may_hold(env: AssessEnv) -> None:
    """A handler runs on the main thread between two bytecodes. Had it set the stop event, it would take that
    event's lock, which the interrupted thread holds for a moment in every wait on it (the database backoff, the
    wait for a first model): the process would hang until SIGKILL. Here another thread holds the lock while the
    installed SIGTERM handler is called; the handler must return at once and the worker still stop."""
    worker = AssessWorker(env.settings, engine=env.engine, client_id=env.client_id)
    blocked: list[bool] = []
    signalled: list[bool] = []

    def probe() -> None:
        try:
            assert worker.ready.wait(60)
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler)
            with worker.stopping._cond:  # what Event.wait/set/clear hold; private, as the lock in question is
                call = threading.Thread(target=handler, args=(signal.SIGTERM, None), daemon=True)
                call.start()
                call.join(2)
                blocked.append(call.is_alive())
            signalled.append(worker.stopping.wait(5))  # the signal, noted, stops the worker
        finally:
            worker.stop()  # whatever went wrong above, the worker on the main thread must end

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    stats = worker.run()  # on this, the main thread: where the handlers are installed
    prober.join(10)
    assert {sig: signal.getsignal(sig) for sig in saved} == saved, "the handlers were not put back"
    assert blocked == [False], "the handler waited for the stop event's lock"
    assert signalled == [True], "the signal did not stop the worker"
    assert stats is worker.stats


def test_sigterm_finishes_the_batch_acknowledges_and_exits_cleanly(env: AssessEnv, tmp_path: Path) -> None:
    coils = _coils(600, "T")
    log = tmp_path / "assess.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "services.cli", "assess"], env=env.env(), stderr=out)
    try:
        assert wait_for(lambda: b"assess worker ready" in log.read_bytes(), timeout=90), log.read_text()
        publish_coils(env.publisher, env.topics, coils[:300], rate=300)
        assert wait_for(lambda: env.coils() >= 100, timeout=60)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    stored = env.coils()
    announced = {d["coil_id"] for d in env.listener.decisions}
    assert len(announced) == stored  # everything committed was announced before the exit
    with env.worker():  # a restarted worker gets what was left unacknowledged, and nothing twice
        publish_coils(env.publisher, env.topics, coils[300:])
        assert wait_for(lambda: env.coils() == 600, timeout=90), env.coils()
    assert env.count(Assessment.id) == 600


def test_coilguard_announce_sends_stored_decisions_that_never_reached_the_broker(
    env: AssessEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decisions given up after an ACL refusal (or held in a broker session that was lost) are stored but were
    never announced, and nothing is redelivered for them. `coilguard announce` sends those older than its
    window, oldest first, marks each once the broker confirms it, leaves a refused one unannounced with the
    reason, and leaves recent ones to the workers."""
    from services.announce import AlreadyRunning, announce_unannounced
    from services.db.repositories import ANNOUNCE_LOCK_NAMESPACE, release_lock, try_lock

    now = datetime.now(UTC)

    def stored(coil_id: str, line: str, minutes_ago: float) -> None:
        at = now - timedelta(minutes=minutes_ago)
        with env.engine.begin() as conn:
            conn.execute(
                Coil.__table__.insert().values(
                    coil_id=coil_id, line=line, produced_at=at, received_at=at - timedelta(seconds=1), status="NOK",
                    p_nok=0.8, confidence=0.8, decided_at=at, matrix=b"\\x00" * 4,
                )
            )  # fmt: skip

    stored("AN-old-2", "galv-1", 30)
    stored("AN-old-1", "galv-1", 60)
    stored("AN-new", "galv-1", 1)
    stored("AN-refused", "galv-deny", 45)
    real = Topics.decisions
    monkeypatch.setattr(
        Topics,
        "decisions",
        lambda self, line: f"$SYS/coilguard-test/{line}" if line == "galv-deny" else real(self, line),
    )
    got, lock = try_lock(env.engine, ANNOUNCE_LOCK_NAMESPACE, 0, "announce")  # another announce running
    assert got
    with pytest.raises(AlreadyRunning):
        announce_unannounced(env.settings, timedelta(minutes=10), 100, engine=env.engine)
    release_lock(lock)
    done = announce_unannounced(env.settings, timedelta(minutes=10), 100, engine=env.engine)
    assert done.announced == ["AN-old-1", "AN-old-2"] and done.refused == {"AN-refused": "Not authorized"}
    assert wait_for(lambda: len(env.listener.decisions) == 2, timeout=10)
    first = env.listener.decisions[0]
    assert (first["coil_id"], first["decision"], first["latency_ms"]) == ("AN-old-1", "NOK", 1000.0)
    assert env.count(Coil.coil_id, Coil.published_at.is_not(None)) == 2
    again = announce_unannounced(env.settings, timedelta(minutes=10), 100, engine=env.engine)
    assert again.announced == [] and list(again.refused) == ["AN-refused"]  # still refused, still unannounced
    monkeypatch.setattr(Topics, "decisions", real)  # the ACL mended
    cli = subprocess.run(
        [sys.executable, "-m", "services.cli", "announce", "--older-than", "10m", "--line", "galv-deny"],
        env=env.env(worker=False), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0 and "announced 1 stored decisions" in cli.stdout, cli.stderr
    assert wait_for(lambda: len(env.listener.decisions) == 3, timeout=10)
    assert env.count(Coil.coil_id, Coil.published_at.is_(None)) == 1  # the recent one, left to the workers


def test_the_scheduler_announces_stored_decisions_that_never_reached_the_broker(
    env: AssessEnv, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What `coilguard announce` does by hand, the scheduler does every ANNOUNCE_EVERY: a decision given up after
    a refusal reaches the line's consumers once the ACL is mended, with no operator. A line the broker still
    refuses is offered once a pass, and its backlog does not keep the other lines' decisions back; the gauge
    counts what is left, those past ANNOUNCE_MAX_AGE included (left to the command, and logged); a pass that
    finds the lock taken, or a stop, offers nothing."""
    import services.announce as announce
    from services.db.repositories import ANNOUNCE_LOCK_NAMESPACE, release_lock, try_lock
    from services.metrics import METRICS
    from services.scheduler import build_scheduler

    now = datetime.now(UTC)
    rows = [("SA-deny-1", "galv-new", 50), ("SA-deny-2", "galv-new", 40), ("SA-deny-3", "galv-new", 35)]
    rows += [("SA-1", "galv-1", 30), ("SA-2", "galv-1", 20), ("SA-days-old", "galv-1", 2 * 24 * 60)]
    with env.engine.begin() as conn:
        conn.execute(
            Coil.__table__.insert(),
            [
                dict(coil_id=coil_id, line=line, produced_at=at, received_at=at, status="OK", p_nok=0.1,
                     confidence=0.9, decided_at=at, matrix=b"\\x00" * 4)
                for coil_id, line, at in ((c, ln, now - timedelta(minutes=m)) for c, ln, m in rows)
            ],
        )  # fmt: skip
    real = Topics.decisions
    denied = {"galv-new"}
    monkeypatch.setattr(
        Topics, "decisions", lambda self, line: f"$SYS/coilguard-test/{line}" if line in denied else real(self, line)
    )
    monkeypatch.setattr(announce, "CHUNK", 2)
    monkeypatch.setattr(announce, "SCHEDULED_LIMIT", 4)  # the refused line's three alone would fill a pass
    monkeypatch.setattr(announce, "_said_too_old", 0)  # what an earlier test's pass left in this process
    settings = env.settings.model_copy(update={"announce_after": timedelta(minutes=10)})
    assert "announce" in {job.id for job in build_scheduler(settings).get_jobs()}
    switched_off = settings.model_copy(update={"announce_every": None})
    assert "announce" not in {job.id for job in build_scheduler(switched_off).get_jobs()}

    caplog.set_level(logging.INFO, logger="services.announce")
    for _ in range(2):  # the second pass: the refused line offered once more, nothing else left in the window
        done = announce.run_announce(settings, engine=env.engine)
        assert done is not None and done.refused_lines == {"galv-new"}
        assert list(done.refused) == ["SA-deny-1", "SA-deny-2"]  # its first chunk; the third not offered
    assert env.count(Coil.coil_id, Coil.published_at.is_not(None)) == 2  # SA-1, SA-2, in the first pass
    assert METRICS.unannounced._value.get() == 4  # three refused, one past the age limit
    assert caplog.text.count("1 stored decisions older than ANNOUNCE_MAX_AGE (1d)") == 1, caplog.text  # said once
    assert "--older-than 1d" in caplog.text and "offered again every 5m" in caplog.text
    got, lock = try_lock(env.engine, ANNOUNCE_LOCK_NAMESPACE, 0, "announce")
    assert got
    try:
        assert announce.run_announce(settings, engine=env.engine) is None  # `coilguard announce` is running
    finally:
        release_lock(lock)
    denied.clear()  # the ACL mended
    stopping = threading.Event()
    stopping.set()
    assert announce.run_announce(settings, engine=env.engine, stop=stopping).offered == 0  # type: ignore[union-attr]
    done = announce.run_announce(settings, engine=env.engine)
    assert done is not None and done.announced == ["SA-deny-1", "SA-deny-2", "SA-deny-3"] and not done.refused
    assert METRICS.unannounced._value.get() == 1  # the one past ANNOUNCE_MAX_AGE, for `coilguard announce`
    expected = ["SA-1", "SA-2", "SA-deny-1", "SA-deny-2", "SA-deny-3"]
    assert wait_for(lambda: sorted(d["coil_id"] for d in env.listener.decisions) == expected, timeout=10)


def test_a_scheduler_stopping_while_the_broker_is_silent_ends_its_announce_pass_at_once(
    env: AssessEnv,
    broker_proxy: tuple[TcpProxy, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker takes the pass's decisions but never confirms them (a network that drops packets): a stop ends
    the wait within half a second, not after 30 s, and nothing unconfirmed is marked, so the next pass offers it."""
    import services.announce as announce
    from services.mqtt.client import FLUSH_POLL_S, MqttClient

    proxy, via_proxy = broker_proxy
    at = datetime.now(UTC) - timedelta(minutes=20)
    with env.engine.begin() as conn:
        conn.execute(
            Coil.__table__.insert().values(
                coil_id="SS-1", line="galv-1", produced_at=at, received_at=at, status="OK", p_nok=0.1,
                confidence=0.9, decided_at=at, matrix=b"\\x00" * 4,
            )
        )  # fmt: skip
    publish = MqttClient.publish

    def into_the_void(self: MqttClient, *args: object, **kwargs: object) -> object:
        proxy.stall()  # connected; from now on nothing gets through either way
        return publish(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(MqttClient, "publish", into_the_void)
    stopping = threading.Event()
    threading.Timer(1.0, stopping.set).start()
    caplog.set_level(logging.INFO, logger="services.announce")
    started = time.monotonic()
    settings = env.settings.model_copy(update={"mqtt_url": via_proxy})
    assert announce.run_announce(settings, engine=env.engine, stop=stopping) is None
    assert time.monotonic() - started < 1.0 + 3 * FLUSH_POLL_S
    assert "stopped before the broker confirmed 1 decisions" in caplog.text, caplog.text
    assert env.count(Coil.coil_id, Coil.published_at.is_(None)) == 1  # unmarked: the next pass offers it again
    proxy.resume()
