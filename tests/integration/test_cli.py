"""The command line as an operator or a CronJob runs it, against the real PostgreSQL and Mosquitto."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from alembic.script import ScriptDirectory
from cli_runner import coilguard
from sqlalchemy import inspect, text

from ml.dataset import CoilDataset
from services.db.engine import make_engine
from services.db.migrate import alembic_config, head
from services.db.models import TABLE_NAMES
from services.mqtt.client import Inbound, MqttClient
from workflows.messages import parse_coil_message


def test_simulate_publishes_valid_messages_an_ordinary_client_decodes(mqtt_url: str, topic_prefix: str) -> None:
    prefix = f"{topic_prefix}/cli-simulate"
    got: list[Inbound] = []
    with MqttClient(mqtt_url, on_message=got.append) as subscriber:
        subscriber.subscribe(f"{prefix}/sensors/+/matrix")
        started = time.monotonic()
        done = coilguard(
            "simulate", "--coils", "100", "--rate", "50", "--seed", "3",
            env={"COILGUARD_MQTT_URL": mqtt_url, "COILGUARD_MQTT_TOPIC_PREFIX": prefix},
        )  # fmt: skip
        took = time.monotonic() - started
        deadline = time.monotonic() + 10
        while len(got) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert done.returncode == 0, done.stderr
    assert len(got) == 100
    coils = [parse_coil_message(m.payload, topic_line=m.topic.split("/")[-2]) for m in got]
    assert len({c.coil_id for c in coils}) == 100
    assert all(c.thickness.shape == (264, 18) and c.product is not None for c in coils)
    assert took >= 100 / 50 * 0.9  # paced at the asked rate, not dumped at once


def test_simulate_with_a_counter_goes_on_where_the_last_run_stopped(
    mqtt_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    """A restarted simulated gateway (compose's `sim` at every `up`) sends new coil ids, not coil 1 again."""
    prefix = f"{topic_prefix}/cli-simulate-counter"
    counter = tmp_path / "sim" / "galv-1.json"
    got: list[Inbound] = []
    env = {"COILGUARD_MQTT_URL": mqtt_url, "COILGUARD_MQTT_TOPIC_PREFIX": prefix}
    with MqttClient(mqtt_url, on_message=got.append) as subscriber:
        subscriber.subscribe(f"{prefix}/sensors/+/matrix")
        runs = [
            coilguard("simulate", "--coils", "3", "--rate", "0", "--seed", "3", "--counter", str(counter), env=env)
            for _ in range(2)
        ]
        deadline = time.monotonic() + 10
        while len(got) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    assert "the line has made 6 coils" in runs[1].stdout
    coils = [parse_coil_message(m.payload, topic_line="galv-1") for m in got]
    assert [c.coil_id for c in coils] == [f"C-2026-00000{i}" for i in range(1, 7)]
    produced = [c.produced_at for c in coils]
    assert produced == sorted(produced)  # the second run's clock goes on from the first's


def test_simulate_says_so_when_the_broker_refuses_its_coils(mqtt_url: str) -> None:
    """A gateway account the ACL does not cover: Mosquitto refuses every coil (here under $SYS, which it refuses
    to everyone), and the command ends with the reason instead of reporting them published."""
    done = coilguard(
        "simulate", "--coils", "3", "--rate", "0", "--line", "galv-9",
        env={"COILGUARD_MQTT_URL": mqtt_url, "COILGUARD_MQTT_TOPIC_PREFIX": "$SYS/coilguard-test"},
    )  # fmt: skip
    assert done.returncode == 1, done.stdout
    assert "the broker refused 3 of the 3 coils on $SYS/coilguard-test/sensors/galv-9/matrix (Not authorized)" in (
        done.stderr
    )


def test_db_upgrade_and_downgrade_on_an_empty_postgresql(pg_database_factory: Callable[[], str]) -> None:
    url = pg_database_factory()
    up = coilguard("db", "upgrade", env={"COILGUARD_DATABASE_URL": url})
    assert up.returncode == 0, up.stderr
    engine = make_engine(url)
    assert set(TABLE_NAMES) <= set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO coils (coil_id, line, matrix) VALUES ('C-1', 'galv-1', '\\x00')"))
        conn.execute(text("INSERT INTO feedback (coil_id, label, operator) VALUES ('C-1', 'NOK', 'anna')"))
    engine.dispose()
    env = {"COILGUARD_DATABASE_URL": url}
    bare = coilguard("db", "downgrade", env=env)  # no revision: one step (DESIGN §5), the tables kept
    assert bare.returncode == 0, bare.stderr
    one_below = ScriptDirectory.from_config(alembic_config("")).get_revision(head()).down_revision
    assert f"database at revision {one_below}" in bare.stdout
    assert set(TABLE_NAMES) <= set(inspect(make_engine(url)).get_table_names())
    down = coilguard("db", "downgrade", "base", env=env)
    assert down.returncode == 0, down.stderr
    assert set(inspect(make_engine(url)).get_table_names()) <= {"alembic_version"}


def test_db_upgrade_on_sqlite_and_a_dataset_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'cg.db'}"
    up = coilguard("db", "upgrade", env={"COILGUARD_DATABASE_URL": url})
    assert up.returncode == 0, up.stderr
    assert set(TABLE_NAMES) <= set(inspect(make_engine(url)).get_table_names())
    out = tmp_path / "d.npz"
    made = coilguard("dataset", "--coils", "300", "--out", str(out), "--seed", "5")
    assert made.returncode == 0, made.stderr
    data = CoilDataset.load(out)
    assert data.X.shape == (300, 264, 18) and set(data.meta["columns"]) >= {"coating", "y_true"}


def test_a_bad_setting_stops_the_command_with_the_variable_named() -> None:
    refused = coilguard("models", env={"COILGUARD_MQTT_URL": "http://nope"})
    assert refused.returncode != 0
    assert "COILGUARD_MQTT_URL" in refused.stderr


def test_simulate_fails_when_the_broker_never_confirms_its_coils(mqtt_url: str, topic_prefix: str, monkeypatch) -> None:
    """`simulate` ignored the outcome of its flush: coils the broker never acknowledged (a link that drops packets)
    were reported "published" with exit 0. The broker here is real; only its confirmation is taken away."""
    from click.testing import CliRunner

    from services.cli import cli
    from services.mqtt.client import MqttClient

    monkeypatch.setattr(MqttClient, "flush", lambda self, timeout=30.0, stop=None: False)
    env = {"COILGUARD_MQTT_URL": mqtt_url, "COILGUARD_MQTT_TOPIC_PREFIX": f"{topic_prefix}/cli-unconfirmed"}
    done = CliRunner().invoke(cli, ["simulate", "--coils", "2", "--rate", "0"], env=env)
    assert done.exit_code == 1, done.output
    assert "the broker did not confirm the 2 coils" in done.output and "published 2 coils" not in done.output
