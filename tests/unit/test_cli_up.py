"""``coilguard up`` on its embedded defaults (SQLite, the in-process broker), as a newcomer first runs it:
it starts with no model and says how to train one, keeps the coils sent before there is one, starts assessing
once one is registered, decides the coils a sensor gateway publishes, serves them on the API, and stops
cleanly on SIGTERM.

A fresh process on free ports and a scratch folder; no external service is involved.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cli_runner import coilguard
from infra import free_ports

pytestmark = pytest.mark.slow


def _until(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[dict[str, str], httpx.Client, subprocess.Popen, Path]]:
    api_port, broker_port = free_ports(2)
    env = {
        "COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'coilguard.db'}",
        "COILGUARD_MQTT_URL": f"embedded://127.0.0.1:{broker_port}",
        "COILGUARD_MODEL_DIR": str(tmp_path / "models"),
        "COILGUARD_REPORT_DIR": str(tmp_path / "reports"),
        "COILGUARD_API_PORT": str(api_port),
        "COILGUARD_BATCH_WAIT": "0.05",
    }
    log = (tmp_path / "up.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
    try:
        yield env, client, proc, tmp_path / "up.log"
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.seek(0)
        print(log.read())  # shown when the test fails
        log.close()


def test_up_on_embedded_defaults_waits_for_a_model_then_decides_coils_and_stops_cleanly(up) -> None:
    env, api, proc, log = up
    _until(lambda: api.get("/status").status_code == 200, 90, "the API of coilguard up")
    assert api.get("/status").json()["active_models"] == []
    _until(lambda: "coilguard train --assessor cnn" in log.read_text(), 10, "the hint on how to train a model")
    _until(lambda: "coils wait for this worker" in log.read_text(), 30, "AssessCoils to subscribe without a model")
    early = coilguard("simulate", "--coils", "3", "--rate", "0", "--id-prefix", "EARLY", env=env)
    assert early.returncode == 0, early.stderr

    trained = coilguard("train", "--assessor", "cnn", "--data", "sim:300", "--set", "epochs=1", "--register", env=env)
    assert trained.returncode == 0, trained.stderr
    _until(lambda: api.get("/status").json()["alive"].get("assess"), 60, "AssessCoils to start on the new model")

    sent = coilguard("simulate", "--coils", "5", "--rate", "0", "--id-prefix", "UP", env=env)
    assert sent.returncode == 0, sent.stderr

    def decided() -> list[dict]:
        return [c for c in api.get("/coils").json()["items"] if c["status"] in ("OK", "NOK")]

    _until(lambda: len(decided()) == 8, 60, "eight decided coils")
    assert sorted(c["coil_id"][:2] for c in decided()) == ["EA"] * 3 + ["UP"] * 5  # none sent early was lost
    votes = api.get(f"/coils/{decided()[0]['coil_id']}").json()["votes"]
    assert [v["model"] for v in votes] == ["cnn"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def test_a_ctrl_c_while_up_starts_stops_what_had_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted between the assess worker's start and the API's, `up` left the worker running on under a broker
    that was shutting down."""
    from services import up as up_module
    from services.config import load_settings

    stopped: list[str] = []
    stop = up_module.AssessThread.stop

    def seen_stopping(self: up_module.AssessThread) -> None:
        stopped.append("assess")
        stop(self)

    monkeypatch.setattr(up_module.AssessThread, "stop", seen_stopping)

    def interrupted(settings: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(up_module, "build_scheduler", interrupted)
    (broker_port,) = free_ports(1)
    settings = load_settings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path / 'coilguard.db'}",
        mqtt_url=f"embedded://127.0.0.1:{broker_port}",
        model_dir=tmp_path / "models",
        report_dir=tmp_path / "reports",
    )
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            up_module.run_up(settings, say=lambda _: None)
    finally:
        signal.signal(signal.SIGINT, handler)  # `up`'s shutdown makes a second Ctrl-C end the process at once
    assert stopped == ["assess"]


def test_up_on_a_broker_port_another_process_holds_says_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = coilguard(
            "up",
            env={
                "COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'coilguard.db'}",
                "COILGUARD_MQTT_URL": f"embedded://127.0.0.1:{port}",
                "COILGUARD_MODEL_DIR": str(tmp_path / "models"),
                "COILGUARD_REPORT_DIR": str(tmp_path / "reports"),
            },
        )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"error: the embedded MQTT broker did not start on 127.0.0.1:{port}" in run.stderr
    assert "COILGUARD_MQTT_URL=embedded://127.0.0.1:PORT" in run.stderr


def test_retire_takes_the_retired_workers_id_from_the_command_line_only(tmp_path: Path) -> None:
    """In an assess pod the environment names the live worker (its pod name): `coilguard assess --retire` run there
    without --client-id would take that worker's session over and end it."""
    from click.testing import CliRunner

    from services.cli import cli

    env = {
        "COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cg.db'}",
        "COILGUARD_MQTT_URL": "embedded",
        "COILGUARD_MQTT_CLIENT_ID": "coilguard-assess-0",
    }
    result = CliRunner().invoke(cli, ["assess", "--retire"], env=env)
    assert result.exit_code == 2 and "--retire needs the retired worker's --client-id" in result.output
