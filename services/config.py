"""Settings for every coilguard process, read from ``COILGUARD_*`` variables or a ``.env`` file.

A plant engineer sets these in a ConfigMap, a compose file or a shell; a wrong value must stop the
process at start with a message naming the variable, not fail later inside a worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "COILGUARD_"
OFF = "off"  # a schedule that never runs


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable and the reason."""


@dataclass(frozen=True)
class MqttUrl:
    """A parsed ``MQTT_URL``: ``mqtt://[user[:pass]@]host[:port][?client_id=…]``, ``mqtts://…`` or ``embedded``.

    ``embedded`` runs an in-process broker (amqtt) on ``embedded_port``; amqtt speaks MQTT 3.1.1 only,
    so clients fall back to v3.1.1 and plain subscriptions there.
    """

    scheme: Literal["mqtt", "mqtts", "embedded"]
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    tls_insecure: bool = False

    @property
    def embedded(self) -> bool:
        return self.scheme == "embedded"

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    @classmethod
    def parse(cls, raw: str) -> MqttUrl:
        raw = raw.strip()
        if raw == "embedded":
            return cls(scheme="embedded", port=18830)
        parts = urlsplit(raw)
        if parts.scheme not in ("mqtt", "mqtts", "embedded"):
            raise ValueError(f"scheme must be mqtt://, mqtts:// or 'embedded', got {raw!r}")
        if not parts.hostname:
            raise ValueError(f"no host in {raw!r}")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in {raw!r}") from exc
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"client_id", "tls_insecure"}
        if unknown:
            raise ValueError(f"unknown MQTT_URL option(s) {sorted(unknown)}; allowed: client_id, tls_insecure")
        default_port = 8883 if parts.scheme == "mqtts" else (18830 if parts.scheme == "embedded" else 1883)
        return cls(
            scheme=parts.scheme,  # type: ignore[arg-type]
            host=parts.hostname,
            port=port or default_port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            client_id=query.get("client_id"),
            tls_insecure=query.get("tls_insecure", "false").lower() in ("1", "true", "yes"),
        )

    def redacted(self) -> str:
        if self.embedded:
            return f"embedded (127.0.0.1:{self.port})"
        user = f"{self.username}:***@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: str | float | int | timedelta) -> timedelta:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``1w`` → timedelta (a bare number is seconds)."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        return timedelta(seconds=float(value))
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 60s, 15m, 24h, 7d)")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _not_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError(f"must not be negative, got {value.total_seconds():g} s")
    return value


def _positive(value: timedelta) -> timedelta:
    """A period of zero would run its job in a loop (heartbeats, ModelScore) or, for a window, see nothing."""
    if value <= timedelta(0):
        raise ValueError(f"must be longer than zero, got {value.total_seconds():g} s")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]
WaitDuration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_not_negative)]


def _sqlalchemy_url(url: str) -> str:
    """Let operators write the usual ``postgresql://`` URL; SQLAlchemy needs the psycopg 3 driver named."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


class Settings(BaseSettings):
    """Every knob of coilguard. Defaults are the embedded single-machine setup and the paper's thresholds."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    # where things live
    database_url: str = "sqlite:///./var/coilguard.db"
    mqtt_url: str = "embedded"
    mqtt_topic_prefix: str = "coilguard"
    mqtt_client_id: str | None = None
    model_dir: Path = Path("var/models")
    report_dir: Path = Path("var/reports")

    # AssessCoils
    decision_threshold: float = Field(0.5, gt=0, lt=1)
    batch_size: int = Field(64, ge=1, le=4096)
    batch_wait: WaitDuration = timedelta(0)  # 0: natural batching, take what has queued up while busy
    torch_threads: int = Field(0, ge=0, le=256, description="intra-op threads for inference; 0 = torch's default")
    inference_shards: int = Field(
        2,
        ge=1,
        le=64,
        description="split a batch of at least 16 coils over this many threads, torch_threads divided among them: on "
        "2 cores shared with the database and the broker, 2 single-threaded shards decided 18-20 % more coils/s "
        "than one batch on 2 threads (docs/benchmarks.md)",
    )
    gil_switch_ms: float = Field(
        0.5,
        gt=0,
        le=100,
        description="Python's thread switch interval in the worker: the inference thread needs the GIL between torch "
        "ops and should not wait Python's default 5 ms while the committer or network thread runs Python code",
    )
    max_payload_bytes: int = Field(1 << 20, ge=1024)
    device: str = "auto"

    # ModelScore / ReTrain (the paper: score below 75 % over more than 10 coils, weekly)
    score_threshold: float = Field(0.75, gt=0, le=1)
    min_scored_coils: int = Field(10, ge=0)
    score_every: Duration = timedelta(minutes=5)
    score_window: Duration | None = None
    retrain_cron: str = "0 3 * * 1"
    retrain_margin: float = Field(0.0, ge=0, le=1)
    retrain_recalibrate: bool = Field(
        True,
        description="ReTrain puts the champion's history in the gauges' current calibration, read from the newest "
        "labelled OK coils, before training the challenger (ml/recalibration.py)",
    )
    retrain_read_through: bool = Field(
        True,
        description="after a gauge drift ReTrain also offers the champion reading through the gauges' gains, taken "
        "unless the retrained challenger does better on the holdout",
    )
    drift_cron: str = "30 2 * * *"
    drift_window: Duration = timedelta(hours=24)
    drift_share: float = Field(0.2, gt=0, le=1, description="share of drifted features that makes a window drifted")
    drift_min_coils: int = Field(30, ge=1, description="fewer coils in the window: no drift report")

    # API and logs
    api_host: str = "127.0.0.1"
    api_port: int = Field(8080, ge=1, le=65535)
    api_token: SecretStr | None = None
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics of a worker process; 0 = off")
    heartbeat_every: Duration = timedelta(seconds=10)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        value = _sqlalchemy_url(value.strip())
        if "://" not in value:
            raise ValueError(f"not a database URL: {value!r} (e.g. postgresql://user@host/db or sqlite:///file)")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        MqttUrl.parse(value)
        return value.strip()

    @field_validator("mqtt_topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#") or value.startswith("/") or value.endswith("/"):
            raise ValueError(f"topic prefix must be a plain topic level path without + or #, got {value!r}")
        return value

    @field_validator("retrain_cron", "drift_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        """A crontab line, or ``off``: the scheduler leaves that job out (on Kubernetes, a CronJob runs ReTrain)."""
        from apscheduler.triggers.cron import CronTrigger

        if value.strip().lower() == OFF:
            return OFF
        CronTrigger.from_crontab(value)
        return value

    @property
    def mqtt(self) -> MqttUrl:
        return MqttUrl.parse(self.mqtt_url)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's error into one readable line per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper()
            lines.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
