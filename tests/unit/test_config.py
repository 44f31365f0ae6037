from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from services.config import ConfigError, MqttUrl, format_duration, load_settings, parse_duration
from workflows.topics import Topics


def test_defaults_are_the_embedded_setup_and_the_papers_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("COILGUARD_DATABASE_URL", "COILGUARD_MQTT_URL"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings(_env_file=None)
    assert settings.is_sqlite and settings.mqtt.embedded
    assert settings.score_threshold == 0.75 and settings.min_scored_coils == 10
    assert settings.mqtt_topic_prefix == "coilguard"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COILGUARD_DATABASE_URL", "postgresql://u:p@db:5432/cg")
    monkeypatch.setenv("COILGUARD_MQTT_URL", "mqtts://anna:s%40cret@broker.plant:8883?client_id=w1")
    monkeypatch.setenv("COILGUARD_BATCH_WAIT", "50ms")
    settings = load_settings(_env_file=None)
    assert settings.database_url == "postgresql+psycopg://u:p@db:5432/cg"
    url = settings.mqtt
    assert (url.scheme, url.host, url.port, url.username, url.password, url.client_id) == (
        "mqtts",
        "broker.plant",
        8883,
        "anna",
        "s@cret",
        "w1",
    )
    assert "s@cret" not in url.redacted()
    assert settings.batch_wait == timedelta(milliseconds=50)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("COILGUARD_MQTT_URL", "http://broker:1883"),
        ("COILGUARD_MQTT_URL", "mqtt://:1883"),
        ("COILGUARD_MQTT_URL", "mqtt://broker:notaport"),
        ("COILGUARD_SCORE_THRESHOLD", "1.5"),
        ("COILGUARD_BATCH_WAIT", "soon"),
        ("COILGUARD_RETRAIN_CRON", "every monday"),
        ("COILGUARD_MQTT_TOPIC_PREFIX", "plant/#"),
        ("COILGUARD_DATABASE_URL", "not a url"),
        ("COILGUARD_HEARTBEAT_EVERY", "0"),  # every process would write its heartbeat in a busy loop
        ("COILGUARD_SCORE_EVERY", "0s"),
        ("COILGUARD_SCORE_WINDOW", "0"),  # a window of nothing: no score, so never a ReTrain, silently
        ("COILGUARD_DRIFT_WINDOW", "0h"),
        ("COILGUARD_ANNOUNCE_EVERY", "0"),  # the announce pass in a busy loop
        ("COILGUARD_ANNOUNCE_EVERY", "1ms"),
        ("COILGUARD_ANNOUNCE_AFTER", "0s"),  # every worker's in-flight decisions sent twice
        ("COILGUARD_ANNOUNCE_AFTER", "20s"),  # a batch awaiting the broker's word for up to 30 s: sent twice
        ("COILGUARD_ANNOUNCE_MAX_AGE", "soon"),
    ],
)
def test_a_bad_value_stops_with_the_variable_named(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        load_settings(_env_file=None)


def test_dotenv_file_is_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COILGUARD_MQTT_TOPIC_PREFIX", raising=False)
    env = tmp_path / ".env"
    env.write_text("COILGUARD_MQTT_TOPIC_PREFIX=plant7\n")
    assert load_settings(_env_file=env).mqtt_topic_prefix == "plant7"


def test_durations() -> None:
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration(1.5) == timedelta(seconds=1.5)
    with pytest.raises(ValueError):
        parse_duration("1 fortnight")
    assert load_settings(_env_file=None, batch_wait="0").batch_wait == timedelta(0)  # no waiting is a choice
    assert load_settings(_env_file=None, announce_every="off").announce_every is None  # left to the command
    assert load_settings(_env_file=None, announce_every="1m").announce_every == timedelta(minutes=1)
    assert load_settings(_env_file=None, announce_max_age="off").announce_max_age is None  # however old
    assert [format_duration(parse_duration(d)) for d in ("24h", "90s", "1500ms", "7d", "2w", "0", "36h")] == [
        "1d", "90s", "1500ms", "1w", "2w", "0ms", "36h",
    ]  # fmt: skip


def test_an_announce_window_narrower_than_one_pass_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decisions would age out between two passes without being offered."""
    monkeypatch.setenv("COILGUARD_ANNOUNCE_MAX_AGE", "12m")
    with pytest.raises(ConfigError, match=r"COILGUARD_ANNOUNCE_MAX_AGE \(12m\) must be at least .* \(15m\)"):
        load_settings(_env_file=None)
    monkeypatch.setenv("COILGUARD_ANNOUNCE_EVERY", "off")  # no pass: nothing to age out of
    assert load_settings(_env_file=None).announce_max_age == timedelta(minutes=12)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA"])
def test_a_device_torch_would_refuse_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """`gpu` failed every ReTrain pass before any run was opened, with nothing on the runs' rows."""
    monkeypatch.setenv("COILGUARD_DEVICE", device)
    with pytest.raises(ConfigError, match="COILGUARD_DEVICE"):
        load_settings(_env_file=None)
    monkeypatch.setenv("COILGUARD_DEVICE", "cuda:1")
    assert load_settings(_env_file=None).device == "cuda:1"


def test_embedded_url() -> None:
    assert MqttUrl.parse("embedded").embedded


def test_topics() -> None:
    topics = Topics("plant")
    assert topics.sensors("galv-1") == "plant/sensors/galv-1/matrix"
    assert topics.shared_sensors() == "$share/coilguard-assess/plant/sensors/+/matrix"
    assert topics.decisions("galv-1") == "plant/decisions/galv-1"
    assert topics.rejected(None) == "plant/rejected/unknown"
    assert topics.model_events == "plant/events/models"
    assert topics.line_of("plant/sensors/galv-2/matrix") == "galv-2"
    assert topics.line_of("plant/sensors/a/b/matrix") is None
    assert topics.line_of("other/sensors/a/matrix") is None


def test_no_other_client_takes_the_workers_client_id() -> None:
    """`coilguard simulate`, the demo's publisher and listener, ReTrain's events: a client of the same MQTT_URL
    under the worker's id would take the worker's persistent session over and discard the coils queued in it."""
    from services.mqtt.client import MqttClient
    from services.runtime import mqtt_client

    settings = load_settings(_env_file=None, mqtt_url="mqtt://broker:1883?client_id=line-2-a", mqtt_client_id="pod-0")
    others = {mqtt_client(settings).client_id, mqtt_client(settings).client_id, MqttClient(settings.mqtt).client_id}
    assert len(others) == 3 and not others & {"line-2-a", "pod-0"}
    assert mqtt_client(settings, client_id="given").client_id == "given"


def test_a_workers_client_id_is_given_or_stable_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The persistent session belongs to the id: it must survive restarts and differ between hosts."""
    import socket

    from services.workers.assess import worker_client_id

    monkeypatch.delenv("COILGUARD_MQTT_CLIENT_ID", raising=False)
    plain = load_settings(_env_file=None, mqtt_url="mqtt://broker:1883")
    assert worker_client_id(plain) == f"coilguard-assess-{socket.gethostname()}" == worker_client_id(plain)
    in_url = load_settings(_env_file=None, mqtt_url="mqtt://broker:1883?client_id=line-2-a")
    assert worker_client_id(in_url) == "line-2-a"
    both = load_settings(_env_file=None, mqtt_url="mqtt://broker:1883?client_id=line-2-a", mqtt_client_id="pod-0")
    assert worker_client_id(both) == "pod-0" and worker_client_id(both, "given") == "given"


PASSWORD = "s3cr/et"
PERCENT_ENCODED = "must be percent-encoded"


def refusal(**setting: str) -> str:
    """The message ``load_settings`` stops with for one bad setting."""
    with pytest.raises(ConfigError) as refused:
        load_settings(_env_file=None, **setting)
    return str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        f"mqtt://anna:{PASSWORD}@broker:1883",  # '/' ends the host part early: the parser blamed the "port"
        "mqtt://anna:s3cr?et@broker:1883",
        "mqtt://anna:s3cr#et@broker:1883",
        "mqtt://anna:s3cr/et@broker",
    ],
)
def test_an_mqtt_password_with_unencoded_characters_is_masked_and_explained(url: str) -> None:
    message = refusal(mqtt_url=url)
    secret = url.split("anna:")[1].split("@")[0]
    assert secret not in message and "s3cr" not in message
    assert "'mqtt://anna:***@broker" in message and PERCENT_ENCODED in message
    assert "port" not in message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("mqtt://anna:hunter2@broker:notaport", "bad port"),  # the credentials were read: the port is the problem
        ("http://anna:hunter2@broker:1883", "scheme must be"),
        ("mqtt://:hunter2@broker:1883", "a password without a user name"),  # was dropped silently
        ("mqtt://anna:hunter2@broker:0", "bad port 0"),  # was the default port, silently
        ("mqtt://anna:hunter2@broker:1883/plant", "a path"),  # was ignored
        ("mqtt://anna:hunter2@broker:1883#x", "fragment"),
        ("mqtt://anna:hunter2@broker:1883?clientid=w1", "unknown MQTT_URL option"),
    ],
)
def test_a_bad_mqtt_url_is_refused_with_its_reason_and_never_its_password(url: str, reason: str) -> None:
    message = refusal(mqtt_url=url)
    assert reason in message and "COILGUARD_MQTT_URL" in message
    assert "hunter2" not in message and PERCENT_ENCODED not in message


@pytest.mark.parametrize("url", ["mqtt://broker:0", "mqtt://broker/x", "mqtt://:pw@broker"])
def test_what_the_client_would_have_dropped_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        MqttUrl.parse(url)


def test_mqtt_urls_that_mean_what_they_say_are_read() -> None:
    encoded = MqttUrl.parse("mqtt://an%2Fna:s3cr%2Fet%40x@broker:1884/?client_id=a@b")
    assert (encoded.username, encoded.password, encoded.port, encoded.client_id) == ("an/na", "s3cr/et@x", 1884, "a@b")
    assert MqttUrl.parse("mqtts://anna@broker").port == 8883
    assert "s3cr" not in repr(encoded) and "s3cr" not in encoded.redacted()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://anna:s3cr@et@db/coilguard",  # an unencoded '@': the host would have been "et@db"
        "postgresql://anna:s3cr@et:w0rd@db:5432/coilguard",  # and the port "w0rd@db"
        "anna:s3cr@et@db/coilguard",
    ],
)
def test_a_bad_database_url_never_shows_its_password(url: str) -> None:
    message = refusal(database_url=url)
    assert "COILGUARD_DATABASE_URL" in message and "anna:***@db" in message
    assert "s3cr" not in message and "w0rd" not in message


def test_a_database_password_with_an_unencoded_at_sign_is_explained() -> None:
    assert PERCENT_ENCODED in refusal(database_url="postgresql://anna:s3cr@et@db/coilguard")
    assert "postgresql+psycopg://anna:***@db:abc/cg" in refusal(database_url="postgresql://anna:pw@db:abc/cg")
    ok = load_settings(_env_file=None, database_url="postgresql://anna:s3cr%40et@db/coilguard")
    assert ok.database_url == "postgresql+psycopg://anna:s3cr%40et@db/coilguard"


def test_a_plant_ca_is_named_in_the_url_and_must_be_there(tmp_path: Path) -> None:
    """A broker certified by the plant's own CA: without a way to name it, every pod failed with "certificate
    verify failed", and the only way out was `tls_insecure`."""
    ca = tmp_path / "plant-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert MqttUrl.parse(f"mqtts://anna@broker?ca={ca}").ca == str(ca)
    assert MqttUrl.parse("mqtts://anna@broker").ca is None
    with pytest.raises(ValueError, match="is not there"):
        MqttUrl.parse(f"mqtts://broker?ca={tmp_path / 'missing.pem'}")
    with pytest.raises(ValueError, match="for a TLS broker"):
        MqttUrl.parse(f"mqtt://broker?ca={ca}")


def test_a_misspelt_variable_is_named_with_the_setting_it_was_meant_to_be(tmp_path) -> None:
    """`COILGUARD_SCORE_TRESHOLD=0.6` left the rule at 0.75 without a word (pydantic-settings ignores names it does
    not know); every command now warns, in the environment and in .env alike."""
    from services.config import unknown_variables

    env_file = tmp_path / ".env"
    env_file.write_text("COILGUARD_RETRAIN_CRN=off\nCOILGUARD_LOG_LEVEL=INFO\n")
    environ = {
        "COILGUARD_SCORE_TRESHOLD": "0.6",
        "coilguard_api_token": "x",  # settings are read whatever the case
        "COILGUARD_COMMIT": "abc",  # read, but not as a setting
        "COILGUARD_NOTHING_LIKE_IT": "1",
        "PATH": "/bin",
    }
    assert unknown_variables(environ, env_file) == [
        "COILGUARD_NOTHING_LIKE_IT",
        "COILGUARD_RETRAIN_CRN (did you mean COILGUARD_RETRAIN_CRON?)",
        "COILGUARD_SCORE_TRESHOLD (did you mean COILGUARD_SCORE_THRESHOLD?)",
    ]
    assert unknown_variables({"COILGUARD_DRIFT_CRON": "off"}, None) == []


def test_settings_that_only_look_usable_are_refused() -> None:
    """`embedded://10.1.2.3:1883` started the in-process broker on 127.0.0.1 and sent every client to 10.1.2.3, so
    nothing was ever assessed; `BATCH_WAIT=50m` (meant as ms) held each coil for 50 minutes and failed the
    worker's liveness; a duration past what timedelta holds escaped as a traceback."""
    assert MqttUrl.parse("embedded://127.0.0.1:1999").port == 1999
    for url in (
        "embedded://10.1.2.3:1883",
        "embedded://bob:secret@127.0.0.1:1883",
        "embedded://127.0.0.1:1883?tls_insecure=1",
    ):
        with pytest.raises(ValueError, match="the embedded broker takes a port alone") as refused:
            MqttUrl.parse(url)
        assert "secret" not in str(refused.value)
    assert load_settings(_env_file=None, batch_wait="20ms").batch_wait == timedelta(milliseconds=20)
    with pytest.raises(ConfigError, match=r"COILGUARD_BATCH_WAIT: .*milliseconds are `ms`"):
        load_settings(_env_file=None, batch_wait="50m")
    with pytest.raises(ConfigError, match=r"COILGUARD_HEARTBEAT_EVERY: .*longer than any clock"):
        load_settings(_env_file=None, heartbeat_every="999999999w")
