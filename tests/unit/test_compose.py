"""docker-compose.yml without a Docker engine: parsed, and held against the CLI and the settings.

Every coilguard service runs a real ``coilguard`` command whose options parse, sets only real settings
with values they accept, and the pieces a plant relies on are in place (health-checked PostgreSQL, an
authenticated Mosquitto with deliberate queue limits, a one-shot migration everything waits for, a
scalable AssessCoils, the sim profile).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from deploy_contract import check_invocation, check_settings, invocations

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
COILGUARD = sorted(n for n, s in SERVICES.items() if "coilguard" in str(s.get("image", "")))


def _mosquitto_conf() -> dict[str, str]:
    conf = {}
    for line in (ROOT / "deploy/mosquitto/mosquitto.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf[key] = value
    return conf


def test_the_coilguard_services_are_there() -> None:
    expected = {"migrate", "assess", "scheduler", "api", "retrain", "bootstrap", "sim"}
    assert expected <= set(COILGUARD)
    assert {"postgres", "mosquitto"} <= set(SERVICES)


@pytest.mark.parametrize("name", COILGUARD)
def test_every_command_is_a_real_coilguard_command(name: str) -> None:
    service = SERVICES[name]
    argv = service.get("entrypoint") or service.get("command")
    found = invocations(argv, entrypoint_is_coilguard="entrypoint" not in service)
    assert found, f"{name} runs no coilguard command: {argv}"
    for args in found:
        check_invocation(args)


@pytest.mark.parametrize("name", COILGUARD)
def test_every_variable_is_a_real_setting(name: str) -> None:
    check_settings(SERVICES[name].get("environment") or {}, f"service {name}")


def test_postgres_is_health_checked_and_migrations_run_once_before_the_rest() -> None:
    assert "pg_isready -h 127.0.0.1" in str(SERVICES["postgres"]["healthcheck"]["test"])  # TCP, not the socket
    command = SERVICES["postgres"]["command"]  # a dead ReTrain host's lock dropped within 2 minutes, not 2 hours
    assert command[0] == "postgres" and "tcp_keepalives_idle=60" in command  # the image's entrypoint still runs
    migrate = SERVICES["migrate"]
    assert migrate["restart"] == "no" and check_invocation(migrate["command"]) == "db upgrade"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in set(COILGUARD) - {"migrate"}:
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name


def test_mosquitto_authenticates_and_queues_deliberately() -> None:
    mosquitto = SERVICES["mosquitto"]
    mounted = {v.split(":")[1] for v in mosquitto["volumes"] if v.startswith("./")}
    assert {"/mosquitto/config/mosquitto.conf", "/mosquitto/config/acl"} <= mounted
    assert "healthcheck" in mosquitto
    conf = _mosquitto_conf()
    assert conf["allow_anonymous"] == "false" and conf["persistence"] == "true"
    assert conf["acl_file"] == "/mosquitto/config/acl" and conf["password_file"] == "/mosquitto/passwd/passwd"
    assert int(conf["max_queued_messages"]) >= 100_000  # Mosquitto's 1000 drops QoS 1 messages in a burst
    assert int(conf["max_queued_bytes"]) > 0 and int(conf["max_inflight_messages"]) >= 4 * 64
    acl = (ROOT / "deploy/mosquitto/acl").read_text()
    assert "topic read $share/coilguard-assess/coilguard/sensors/+/matrix" in acl  # the workers' shared subscription
    assert "mosquitto_passwd" in str(mosquitto["entrypoint"])  # hashed at start, from .env


def test_each_assess_worker_keeps_one_fixed_client_id() -> None:
    """The persistent session (and the share of the stream queued for it) belongs to the client id: an id that
    changes when the container is recreated strands the old session's share."""
    workers = {name: svc for name, svc in SERVICES.items() if name == "assess" or name.startswith("assess-")}
    ids = []
    for name, worker in workers.items():
        (args,) = invocations(worker["command"], entrypoint_is_coilguard=True)
        assert args[0] == "assess" and "--client-id" in args, name
        ids.append(args[args.index("--client-id") + 1])
    assert all("$" not in i for i in ids) and len(set(ids)) == len(ids), ids


def test_api_is_published_and_health_checked() -> None:
    api = SERVICES["api"]
    assert api["environment"]["COILGUARD_API_HOST"] == "0.0.0.0"
    assert any(str(p).endswith(":8080") for p in api["ports"]) and "/health/ready" in str(api["healthcheck"])


def test_profiles_sim_and_gpu_retrain() -> None:
    assert SERVICES["sim"]["profiles"] == ["sim"] and SERVICES["bootstrap"]["profiles"] == ["sim"]
    assert "gateway:" in SERVICES["sim"]["environment"]["COILGUARD_MQTT_URL"]
    retrain = SERVICES["retrain"]
    assert retrain["build"]["dockerfile"] == "Dockerfile.cuda"
    assert retrain["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_files_the_compose_file_needs_exist() -> None:
    for name in ("Dockerfile", "Dockerfile.cuda", ".dockerignore", "deploy/mosquitto/passwd.example"):
        assert (ROOT / name).is_file(), name
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        assert 'ENTRYPOINT ["coilguard"]' in (ROOT / dockerfile).read_text()
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    example = (ROOT / "deploy/compose.env.example").read_text()
    assert all(re.search(rf"^{name}=", example, re.M) for name in required), required


def test_the_scheduler_retrains_and_has_time_to_stop_at_an_epoch() -> None:
    scheduler = SERVICES["scheduler"]
    assert scheduler["environment"].get("COILGUARD_RETRAIN_CRON") != "off"  # here ReTrain runs in the scheduler
    assert scheduler["stop_grace_period"] == "300s"  # Docker's default 10 s would kill it mid-epoch
