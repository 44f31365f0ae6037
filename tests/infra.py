"""Finding the real PostgreSQL and Mosquitto that integration tests talk to.

Order: ``COILGUARD_TEST_DATABASE_URL`` / ``COILGUARD_TEST_MQTT_URL``; else the local services on
127.0.0.1 (PostgreSQL 5432 as ``postgres``, Mosquitto 1883) when they answer; else testcontainers
when a Docker engine answers. ``None`` means none was found; the caller decides to skip or, with
``CI=true``, to fail.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_MQTT = "mqtt://127.0.0.1:1883"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (each socket stays bound until all are read, so none is handed out
    twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-not-found]

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@dataclass
class Found:
    url: str
    origin: str  # "env", "local" or "container"


@contextlib.contextmanager
def postgres_server() -> Iterator[Found | None]:
    """Yield an admin URL of a PostgreSQL server (any database on it), or None."""
    if url := os.environ.get("COILGUARD_TEST_DATABASE_URL"):
        yield Found(url, "env")
    elif port_open("127.0.0.1", 5432):
        yield Found(LOCAL_POSTGRES, "local")
    elif docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as pg:
            yield Found(pg.get_connection_url(), "container")
    else:
        yield None


@contextlib.contextmanager
def mosquitto_server() -> Iterator[Found | None]:
    """Yield an ``mqtt://`` URL of a Mosquitto broker, or None."""
    if url := os.environ.get("COILGUARD_TEST_MQTT_URL"):
        yield Found(url, "env")
    elif port_open("127.0.0.1", 1883):
        yield Found(LOCAL_MQTT, "local")
    elif docker_answers():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        container = DockerContainer("eclipse-mosquitto:2.0.22").with_exposed_ports(1883)
        container.with_command("mosquitto -c /mosquitto-no-auth.conf")
        with container:
            wait_for_logs(container, "running")
            host, port = container.get_container_host_ip(), container.get_exposed_port(1883)
            yield Found(f"mqtt://{host}:{port}", "container")
    else:
        yield None
