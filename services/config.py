"""Settings for every coilguard process, read from ``COILGUARD_*`` variables or a ``.env`` file.

A plant engineer sets these in a ConfigMap, a compose file or a shell; a wrong value must stop the
process at start with a message naming the variable, not fail later inside a worker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "COILGUARD_"
MAX_BATCH_WAIT = timedelta(seconds=5)
OFF = "off"  # a schedule that never runs


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable and the reason."""


@dataclass(frozen=True)
class MqttUrl:
    """A parsed ``MQTT_URL``: ``mqtt://[user[:pass]@]host[:port][?client_id=…]``, ``mqtts://…[?ca=/path/ca.pem]``
    or ``embedded``.

    ``ca``: the PEM file of the certificate authorities a TLS broker's certificate is checked against, for a plant
    CA the image's system store does not hold (without it, only those are trusted).

    ``embedded`` runs an in-process broker (amqtt) on ``embedded_port``; amqtt speaks MQTT 3.1.1 only,
    so clients fall back to v3.1.1 and plain subscriptions there.
    """

    scheme: Literal["mqtt", "mqtts", "embedded"]
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    client_id: str | None = None
    tls_insecure: bool = False
    ca: str | None = None

    @property
    def embedded(self) -> bool:
        return self.scheme == "embedded"

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    @classmethod
    def parse(cls, raw: str) -> MqttUrl:
        """Read ``raw``; a URL that cannot be used raises ValueError saying why, its password masked."""
        raw = raw.strip()
        if raw == "embedded":
            return cls(scheme="embedded", port=18830)
        parts = urlsplit(raw)
        shown = masked_url(raw)
        if parts.scheme not in ("mqtt", "mqtts", "embedded"):
            raise ValueError(f"scheme must be mqtt://, mqtts:// or 'embedded', got {shown!r}")
        try:
            port, query = _mqtt_port(parts), _mqtt_options(parts.query)
            _check_mqtt_parts(parts)
        except ValueError as exc:
            if _credentials_misread(raw, parts):  # the real cause, not what the parser tripped over after it
                raise ValueError(f"cannot read {shown!r}: {PERCENT_ENCODE_HINT}") from None
            raise ValueError(f"{shown!r}: {exc}") from None
        if parts.scheme == "embedded" and (
            parts.hostname not in (None, "127.0.0.1", "localhost") or parts.username or parts.password or query
        ):  # the in-process broker listens on 127.0.0.1 alone, without accounts: clients sent elsewhere find nothing
            raise ValueError(
                f"{shown!r}: the embedded broker takes a port alone (embedded://127.0.0.1:PORT), no other host, "
                "account or option; for a broker other machines reach, run Mosquitto (docker-compose.yml)"
            )
        ca = query.get("ca") or None
        if ca is not None and parts.scheme != "mqtts":
            raise ValueError(f"{shown!r}: ca= is for a TLS broker (mqtts://)")
        if ca is not None and not Path(ca).is_file():
            raise ValueError(f"{shown!r}: the CA file {ca} is not there (mount it, or correct the path)")
        default_port = 8883 if parts.scheme == "mqtts" else (18830 if parts.scheme == "embedded" else 1883)
        return cls(
            scheme=parts.scheme,  # type: ignore[arg-type]
            host=str(parts.hostname),
            port=default_port if port is None else port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            client_id=query.get("client_id"),
            tls_insecure=query.get("tls_insecure", "false").lower() in ("1", "true", "yes"),
            ca=ca,
        )

    def redacted(self) -> str:
        if self.embedded:
            return f"embedded (127.0.0.1:{self.port})"
        user = f"{self.username}:***@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}"


PERCENT_ENCODE_HINT = (
    "a user name or password with special characters (: / ? # @ % or spaces) must be percent-encoded, "
    "e.g. %2F for /, %40 for @, %3A for :"
)
MQTT_OPTIONS = ("client_id", "tls_insecure", "ca")


def masked_url(raw: str) -> str:
    """``raw`` for a message, with whatever may be a password replaced by ``***``.

    Cut by hand, not by a URL parser: a password with an unencoded ``/``, ``?``, ``#`` or ``@`` is exactly what
    makes parsers misread a URL. Everything between the first ``:`` of the user part and the last ``@`` is
    masked (an ``@`` in a query value may mask more than needed, never less).
    """
    head, at, host = raw.rpartition("@")
    if not at:
        return raw
    scheme, sep, userinfo = head.partition("://")
    if not sep:
        scheme, sep, userinfo = "", "", head
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{host}"


def _credentials_misread(raw: str, parts: SplitResult) -> bool:
    """An ``@`` that the parser did not take as the end of the credentials: an unencoded character before it
    (``/``, ``?``, ``#``) ended the host part early, and the host, port or path it then read are nonsense."""
    return "@" in raw and "@" not in parts.netloc


def _mqtt_port(parts: SplitResult) -> int | None:
    try:
        port = parts.port
    except ValueError:
        raise ValueError("bad port (a number from 1 to 65535)") from None
    if port == 0:  # was taken as "no port": the default, silently
        raise ValueError("bad port 0 (a number from 1 to 65535)")
    return port


def _mqtt_options(query: str) -> dict[str, str]:
    """The ``?client_id=…&tls_insecure=…&ca=…`` options; anything else is refused rather than ignored."""
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(options) - set(MQTT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown MQTT_URL option(s) {sorted(unknown)}; allowed: {', '.join(MQTT_OPTIONS)}")
    return options


def _check_mqtt_parts(parts: SplitResult) -> None:
    """Refuse what the client would silently drop: a password without a user name, a path, a fragment."""
    if not parts.hostname:
        raise ValueError("no host")
    if parts.password is not None and not parts.username:
        raise ValueError("a password without a user name (mqtt://user:password@host)")
    if parts.path not in ("", "/"):
        raise ValueError("a path (MQTT has none: the topic prefix is COILGUARD_MQTT_TOPIC_PREFIX)")
    if parts.fragment:
        raise ValueError("a '#' fragment")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: str | float | int | timedelta) -> timedelta:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``1w`` → timedelta (a bare number is seconds)."""
    if isinstance(value, timedelta):
        return value
    try:
        if isinstance(value, int | float):
            return timedelta(seconds=float(value))
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 60s, 15m, 24h, 7d)")
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    except OverflowError:  # not pydantic's kind of error: it would escape as a traceback
        raise ValueError(f"not a duration: {value!r} is longer than any clock can count") from None


def format_duration(value: timedelta) -> str:
    """The largest unit that divides it (``1d`` for 24 h, ``90s``, ``1500ms``): what :func:`parse_duration` reads back,
    for a log line that names a setting or a command's option."""
    ms = round(value.total_seconds() * 1000)
    for unit in ("w", "d", "h", "m", "s"):
        size = round(_UNIT_SECONDS[unit] * 1000)
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


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


def _check_database_url(value: str) -> None:
    """Read ``value`` as SQLAlchemy will, at start: a password is never shown, and a host that swallowed part of
    the credentials (an unencoded ``@`` in the password) is named as that."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = masked_url(value)
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):  # its message may quote part of a misread password: not shown
        hint = f": is the port a number? And {PERCENT_ENCODE_HINT}" if "@" in value else ""
        raise ValueError(f"cannot read the database URL {shown!r}{hint}") from None
    if url.host is not None and "@" in url.host:
        raise ValueError(f"cannot read the database URL {shown!r}: {PERCENT_ENCODE_HINT}")


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
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (the GPU when present), cpu, cuda or cuda:N: anything else (a typo such as `gpu`) failed "
        "every ReTrain pass before any run was opened",
    )

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
    model_keep: int | None = Field(
        3,
        ge=1,  # 0 would remove the champion just retired: what workers serve until their next poll, and a rollback
        description="after each ReTrain pass, MODEL_DIR keeps this many retired versions per name (those that served "
        "last: rollback targets) and removes the files of older and failed ones (`coilguard models prune`); off "
        "removes nothing",
    )
    drift_cron: str = "30 2 * * *"
    drift_window: Duration = timedelta(hours=24)
    drift_share: float = Field(0.2, gt=0, le=1, description="share of drifted features that makes a window drifted")
    drift_min_coils: int = Field(30, ge=1, description="fewer coils in the window: no drift report")
    announce_every: Duration | None = Field(
        timedelta(minutes=5),
        description="how often the scheduler announces decisions stored but never confirmed by the broker (given up "
        "after an ACL refusal, held in a lost broker session); off leaves them to `coilguard announce`",
    )
    announce_after: Duration = Field(
        timedelta(minutes=10),
        description="a decision is announced by the scheduler (or `coilguard announce`) only once it is stored this "
        "long: the worker that decided it announces it itself until then (at least a minute: a worker waits up to "
        "30 s for the broker's word on a batch)",
    )
    announce_max_age: Duration | None = Field(
        timedelta(hours=24),
        description="the scheduler offers a decision until it is this old; older ones (a line's ACL broken for a "
        "day, decisions from before an upgrade) are counted and logged, and left to `coilguard announce`; off: no "
        "limit",
    )
    drift_keep: Duration | None = Field(
        timedelta(days=400),
        description="drift report files older than this are deleted after each new report (their rows and "
        "figures stay); off keeps every file. Each HTML carries Evidently's 3.5 MB script",
    )

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
            raise ValueError(
                f"not a database URL: {masked_url(value)!r} (e.g. postgresql://user@host/db or sqlite:///file)"
            )
        _check_database_url(value)
        return value

    @field_validator("api_token")
    @classmethod
    def _api_token(cls, value: SecretStr | None) -> SecretStr | None:
        """Printable ASCII: HTTP header values arrive as latin-1, so a token with other characters could never be
        sent as it is compared, and every write would be refused with 401."""
        if value is not None and not all(" " < c < "\x7f" for c in value.get_secret_value()):
            raise ValueError("the API token must be printable ASCII without spaces (e.g. `openssl rand -hex 32`)")
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

    @field_validator("drift_keep", "announce_every", "announce_max_age", "model_keep", mode="before")
    @classmethod
    def _keep(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() == OFF else value

    @field_validator("announce_after")
    @classmethod
    def _announce_after(cls, value: timedelta) -> timedelta:
        """Shorter, the pass would race the workers for decisions still awaiting the broker's word: sent twice."""
        if value < timedelta(minutes=1):
            raise ValueError(f"must be at least 1m, got {value.total_seconds():g} s")
        return value

    @field_validator("announce_every")
    @classmethod
    def _announce_every(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(seconds=10):
            raise ValueError(f"must be at least 10s (or off), got {value.total_seconds():g} s")
        return value

    @model_validator(mode="after")
    def _announce_window(self) -> Settings:
        """The scheduler offers a decision while it is between ``ANNOUNCE_AFTER`` and ``ANNOUNCE_MAX_AGE`` old: a
        window shorter than one ``ANNOUNCE_EVERY`` would let decisions age out between two passes, unoffered."""
        after, every, max_age = self.announce_after, self.announce_every, self.announce_max_age
        if max_age is not None and every is not None and max_age < after + every:
            raise ValueError(
                f"{ENV_PREFIX}ANNOUNCE_MAX_AGE ({format_duration(max_age)}) must be at least "
                f"{ENV_PREFIX}ANNOUNCE_AFTER + {ENV_PREFIX}ANNOUNCE_EVERY ({format_duration(after + every)}), or off"
            )
        return self

    @field_validator("batch_wait")
    @classmethod
    def _batch_wait(cls, value: timedelta) -> timedelta:
        """Each coil may wait this long for company: against a 50 ms decision target, seconds are a mistake (`50m`
        for `50ms`), and the worker's loop does not come round meanwhile (its liveness probe gives up)."""
        if value > MAX_BATCH_WAIT:
            raise ValueError(f"at most {MAX_BATCH_WAIT.total_seconds():g} s (milliseconds are `ms`, e.g. 20ms)")
        return value

    @field_validator("retrain_cron", "drift_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        """A crontab line, or ``off``: the scheduler leaves that job out (on Kubernetes, a CronJob runs ReTrain)."""
        from services.cron import crontab_trigger

        if value.strip().lower() == OFF:
            return OFF
        crontab_trigger(value)
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
            if err["loc"]:
                lines.append(f"{ENV_PREFIX}{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}")
            else:  # a rule between settings: its message names them
                lines.append(str(err["msg"]).removeprefix("Value error, "))
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


# COILGUARD_ variables that are read, but not as settings: the build's commit, compose's image names, the test
# suite's services.
NOT_SETTINGS = frozenset(
    {
        "COILGUARD_COMMIT",
        "COILGUARD_IMAGE",
        "COILGUARD_CUDA_IMAGE",
        "COILGUARD_TEST_DATABASE_URL",
        "COILGUARD_TEST_MQTT_URL",
    }
)


def unknown_variables(environ: Mapping[str, str] | None = None, env_file: Path | None = Path(".env")) -> list[str]:
    """Each ``COILGUARD_`` variable (of the environment and ``.env``) that is no setting, with the setting it was
    probably meant to be: a misspelt name (``COILGUARD_SCORE_TRESHOLD``) is otherwise ignored without a word, and
    the default it leaves in force (the API's writes refused, ReTrain still on) looks like a fault elsewhere."""
    import difflib
    import os

    from dotenv import dotenv_values

    names = {name.upper() for name in (os.environ if environ is None else environ)}
    if env_file is not None and env_file.is_file():
        names |= {name.upper() for name in dotenv_values(env_file)}
    known = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    unknown = sorted(n for n in names if n.startswith(ENV_PREFIX) and n not in known and n not in NOT_SETTINGS)
    said = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        said.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return said


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
