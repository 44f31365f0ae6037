"""The REST API served by uvicorn over real PostgreSQL (and a real Mosquitto for readiness).

Operator feedback goes in with the token and comes back out through the coil; without the token it
is refused; and schemathesis, driving every operation from the published OpenAPI document, finds no
server error and no response that breaks the document.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from infra import free_ports
from schemathesis import checks
from sqlalchemy import Engine, delete, func, insert, select, text

from services.api import create_app
from services.config import Settings, load_settings
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.models import Assessment, Coil, DriftReport, Feedback, ModelPerformance, Worker
from services.db.repositories import SqlModelRegistry, matrix_bytes

TOKEN = "plant-tool-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_COILS = 30
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)


@dataclass
class Api:
    base: str
    engine: Engine
    settings: Settings

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=30, **kwargs)


def _seed(engine: Engine, report_dir: Path) -> None:
    """Two model versions, coils on two lines with their votes, a ModelScore row, a drift report, workers."""
    registry = SqlModelRegistry(engine)
    old = registry.add(name="cnn", kind="cnn", version=1, artifact_uri="cnn/v1", sha256="0" * 64, status="active")
    new = registry.add(
        name="cnn",
        kind="cnn",
        version=2,
        artifact_uri="cnn/v2",
        sha256="1" * 64,
        metrics={"validation": {"f1_nok": 0.81, "roc_auc": None}},
        status="active",
        parent_id=old.id,
    )
    matrix = np.full((264, 18), 140.0, dtype=np.float32)
    matrix[0, 0] = np.nan  # a dropped reading
    coils, votes = [], []
    for i in range(N_COILS):
        at = T0 + timedelta(minutes=10 * i)
        status = "NOK" if i % 5 == 0 else "OK"
        coils.append(
            {
                "coil_id": f"C-2026-{i:06d}",
                "line": "galv-1" if i % 3 else "galv-2",
                "produced_at": at,
                "received_at": at,
                "status": status,
                "p_nok": 0.9 if status == "NOK" else 0.1,
                "confidence": 0.8,
                "decided_at": at,
                "matrix": matrix_bytes(matrix),
                "product": {"coating": "Z275", "width_mm": 1250, "thickness_mm": 0.8},
            }
        )
        votes.append(
            {"coil_id": coils[-1]["coil_id"], "model_id": new.id, "label": status, "p_nok": 0.5, "confidence": 1}
        )
    (report_dir / "drift").mkdir(parents=True)
    (report_dir / "drift" / "r1.html").write_text("<!DOCTYPE html><html><body>drift report</body></html>")
    with engine.begin() as conn:
        conn.execute(insert(Coil.__table__), coils)
        conn.execute(insert(Assessment.__table__), votes)
        conn.execute(
            insert(ModelPerformance.__table__),
            [{"model_id": new.id, "n_coils": 12, "n_correct": 9, "score": 0.75, "below_threshold": False}],
        )
        conn.execute(
            insert(DriftReport.__table__),
            [
                {
                    "window_start": T0,
                    "window_end": T0 + timedelta(days=1),
                    "dataset_drift": True,
                    "share_drifted": 0.3,
                    "report_uri": "drift/r1.html",
                    "summary": {"drifted_columns": ["s03_mean"], "columns": {"s03_mean": {"score": 0.001}}},
                },
                {
                    "window_start": T0,
                    "window_end": T0 + timedelta(days=1),
                    "dataset_drift": False,
                    "share_drifted": 0.0,
                    "report_uri": "../../etc/passwd",  # never served: outside the report store
                    "summary": None,
                },
            ],
        )
        conn.execute(
            insert(Worker.__table__),
            [
                {
                    "worker_id": "assess-gone",
                    "kind": "assess",
                    "host": "node-1",
                    "pid": 7,
                    "seen_at": datetime.now(UTC) - timedelta(hours=1),
                    "info": {"backlog": 99},
                },
                {
                    "worker_id": "assess-live",
                    "kind": "assess",
                    "host": "node-2",
                    "pid": 8,
                    "seen_at": datetime.now(UTC),
                    "info": {"backlog": 3},
                },
            ],
        )


@contextlib.contextmanager
def _serve(settings: Settings, engine: Engine, heartbeat: bool = True) -> Iterator[str]:
    port = free_ports()[0]
    app = create_app(settings, engine, heartbeat=heartbeat)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def api(
    pg_database_factory: Callable[[], str], mqtt_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    url = pg_database_factory()
    upgrade(url)
    report_dir = tmp_path_factory.mktemp("reports")
    settings = load_settings(
        _env_file=None, database_url=url, mqtt_url=mqtt_url, api_token=TOKEN, report_dir=report_dir
    )
    engine = make_engine(settings.database_url)
    _seed(engine, report_dir)
    with _serve(settings, engine) as base:
        yield Api(base, engine, settings)
    engine.dispose()


def _feedback_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Feedback.__table__)).scalar_one())


# ----------------------------------------------------------------------------- feedback


def test_feedback_goes_in_with_the_token_and_comes_back_through_the_coil(api: Api) -> None:
    with api.client(headers=AUTH) as client:
        first = client.post("/feedback", json={"coil_id": "C-2026-000007", "label": "NOK", "operator": "anna"})
        assert first.status_code == 201, first.text
        assert first.json()["label"] == "NOK" and first.json()["created_at"].endswith("Z")
        second = client.post(
            "/feedback", json={"coil_id": "C-2026-000007", "label": "OK", "operator": "ben", "comment": "re-checked"}
        )
        assert second.status_code == 201, second.text
        coil = client.get("/coils/C-2026-000007").json()
    assert [(f["label"], f["operator"]) for f in coil["feedback"]] == [("NOK", "anna"), ("OK", "ben")]
    assert coil["operator_label"] == "OK"  # the latest verdict wins
    assert coil["feedback"][1]["comment"] == "re-checked" and coil["feedback"][1]["id"] == second.json()["id"]
    assert [(v["model"], v["version"]) for v in coil["votes"]] == [("cnn", 2)]
    assert coil["matrix"] is None


def test_a_request_without_the_token_is_refused(api: Api) -> None:
    before = _feedback_rows(api.engine)
    body = {"coil_id": "C-2026-000001", "label": "NOK", "operator": "mallory"}
    with api.client() as client:
        missing = client.post("/feedback", json=body)
        wrong = client.post("/feedback", json=body, headers={"Authorization": "Bearer guessed"})
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong token"
    assert _feedback_rows(api.engine) == before


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"coil_id": "C-2026-999999", "label": "NOK", "operator": "anna"}, "coil_id", "has been assessed"),
        ({"coil_id": "C-2026-000001", "label": "MAYBE", "operator": "anna"}, "label", "'OK' or 'NOK'"),
        ({"coil_id": "C 1; DROP TABLE coils", "label": "OK", "operator": "anna"}, "coil_id", "pattern"),
        ({"coil_id": "C-2026-000001", "label": "OK", "operator": ""}, "operator", "at least 1"),
        ({"coil_id": "C-2026-000001", "label": "OK", "operator": "   "}, "operator", "at least 1"),
        ({"coil_id": "C-2026-000001", "label": "OK", "operator": "a\x00b"}, "operator", "visible characters"),
        ({"coil_id": "C-2026-000001", "label": "OK", "operator": "anna\n06:00 INFO forged"}, "operator", "one line"),
        ({"coil_id": "C-2026-000001", "label": "OK", "operator": "an\u200bna"}, "operator", "invisible"),
        ({"coil_id": "C-2026-000001", "label": "OK", "operator": "anna", "comment": "a\x00b"}, "comment", "control"),
        ({"coil_id": "C-2026-000001", "label": "OK", "operator": "anna", "shift": 2}, "shift", "not permitted"),
    ],
)
def test_bad_feedback_is_refused_with_a_reason(api: Api, body: dict, field: str, reason: str) -> None:
    with api.client(headers=AUTH) as client:
        response = client.post("/feedback", json=body)
    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert any(p["loc"][-1] == field and reason in p["msg"] for p in problems), problems


def test_a_read_only_database_is_a_503_not_a_500(api: Api) -> None:
    """After a failover the server answers but refuses writes (SQLSTATE 25006, which psycopg raises as
    InternalError): that is the database being unavailable, as the workers treat it, not a fault of the API."""
    database = api.engine.url.database
    with api.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'))
    api.engine.dispose()  # new sessions take the setting
    try:
        with api.client(headers=AUTH) as client:
            response = client.post("/feedback", json={"coil_id": "C-2026-000001", "label": "OK", "operator": "anna"})
    finally:
        with api.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SET default_transaction_read_only = off"))
            conn.execute(text(f'ALTER DATABASE "{database}" RESET default_transaction_read_only'))
        api.engine.dispose()
    assert response.status_code == 503, response.text
    assert "read-only transaction" in response.json()["detail"]


def test_without_a_configured_token_writes_are_refused_not_open(api: Api) -> None:
    settings = api.settings.model_copy(update={"api_token": None})
    with _serve(settings, api.engine, heartbeat=False) as base, httpx.Client(base_url=base) as client:
        response = client.post("/feedback", json={"coil_id": "C-2026-000001", "label": "OK", "operator": "x"})
    assert response.status_code == 503 and "COILGUARD_API_TOKEN is not set" in response.json()["detail"]


# ----------------------------------------------------------------------------- reading


def test_health_readiness_and_status(api: Api) -> None:
    with api.client() as client:
        assert client.get("/health/live").json() == {"status": "alive"}
        ready = client.get("/health/ready")
        status = client.get("/status").json()
    assert ready.status_code == 200 and ready.json()["checks"]["database"]["ok"]
    assert status["broker"]["ok"]
    alive = {w["worker_id"]: w["alive"] for w in status["workers"]}
    assert alive["assess-live"] and not alive["assess-gone"]
    assert any(w["kind"] == "api" and w["alive"] for w in status["workers"])  # the API's own heartbeat
    assert status["alive"]["assess"] == 1 and status["backlog"]["queued_in_workers"] == 3
    assert status["backlog"]["pending_coils"] == 0 and status["coils_last_24h"] == N_COILS
    assert status["backlog"]["unannounced_decisions"] == N_COILS  # seeded by SQL: none ever reached the broker
    assert [(m["name"], m["version"]) for m in status["active_models"]] == [("cnn", 2)]
    assert status["last_decision_at"] == (T0 + timedelta(minutes=10 * (N_COILS - 1))).isoformat().replace("+00:00", "Z")


def test_still_ready_when_the_broker_is_away_and_status_says_so(api: Api) -> None:
    """The API never uses MQTT: a broker outage must not take it (status, feedback) out of the Service."""
    settings = api.settings.model_copy(update={"mqtt_url": f"mqtt://127.0.0.1:{free_ports()[0]}"})
    with _serve(settings, api.engine, heartbeat=False) as base, httpx.Client(base_url=base, timeout=30) as client:
        ready = client.get("/health/ready")
        status = client.get("/status")
    assert ready.status_code == 200 and set(ready.json()["checks"]) == {"database"}
    assert status.status_code == 200 and not status.json()["broker"]["ok"]
    assert "unreachable" in status.json()["broker"]["detail"]


def test_not_ready_when_the_database_is_away(api: Api) -> None:
    engine = make_engine(f"postgresql://postgres:hunter2@127.0.0.1:{free_ports()[0]}/nowhere")
    body = {"coil_id": "C-2026-000001", "label": "OK", "operator": "anna"}
    with _serve(api.settings, engine, heartbeat=False) as base, httpx.Client(base_url=base, timeout=30) as client:
        response = client.get("/health/ready")
        away = [client.get("/status"), client.get("/coils"), client.post("/feedback", json=body, headers=AUTH)]
    engine.dispose()
    assert response.status_code == 503 and not response.json()["checks"]["database"]["ok"]
    assert [r.status_code for r in away] == [503, 503, 503]  # was a bare 500
    assert all(r.json()["detail"].startswith("database unavailable: ") and "hunter2" not in r.text for r in away)


def test_a_database_that_drops_packets_costs_seconds_not_minutes(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost database node or a firewall that drops packets (nothing refuses the connection): the API must
    answer 503 within the connection timeout, not hang on the system's TCP defaults, and liveness must hold."""
    from tcp_proxy import TcpProxy

    from services.db import engine as engine_module

    monkeypatch.setattr(engine_module, "PG_CONNECT_TIMEOUT_S", 2)
    proxy, via_proxy = TcpProxy.in_front_of(api.settings.database_url, 5432)
    proxy.stall()
    engine = make_engine(via_proxy)
    try:
        with _serve(api.settings, engine, heartbeat=False) as base, httpx.Client(base_url=base, timeout=30) as client:
            started = time.monotonic()
            ready = client.get("/health/ready")
            coils = client.get("/coils")
            took = time.monotonic() - started
            live = client.get("/health/live")
    finally:
        engine.dispose()
        proxy.cut()
    assert ready.status_code == 503 and coils.status_code == 503 and live.status_code == 200
    assert coils.json()["detail"].startswith("database unavailable: ")
    assert took < 10, f"two requests took {took:.1f} s"


def test_libpq_settings_in_the_database_url_win_over_the_defaults(api: Api) -> None:
    url = api.settings.database_url
    engine = make_engine(url + ("&" if "?" in url else "?") + "connect_timeout=3")
    try:
        with engine.connect() as conn:
            dsn = conn.connection.dbapi_connection.info.dsn  # type: ignore[union-attr]
    finally:
        engine.dispose()
    assert "connect_timeout=3 " in dsn and "tcp_user_timeout=30000" in dsn and "keepalives_idle=30" in dsn


def test_no_free_database_connection_is_a_503_and_liveness_still_answers(api: Api) -> None:
    """Every pooled connection taken (requests stuck on a slow database): a 503 that says so, not a bare 500;
    and the liveness probe answers at once although the requests waiting for a connection fill the API's
    thread pool (40 threads), or kubelet would restart the pod for the database's fault."""
    from concurrent.futures import ThreadPoolExecutor

    engine = make_engine(api.settings.database_url, pool_size=1, max_overflow=0, pool_timeout=3)
    try:
        with _serve(api.settings, engine, heartbeat=False) as base, ThreadPoolExecutor(48) as pool:
            with engine.connect():  # the pool's only connection
                stuck = [pool.submit(httpx.get, f"{base}/coils", timeout=30) for _ in range(48)]
                time.sleep(1.0)  # every one of them waiting for the connection
                started = time.monotonic()
                live = httpx.get(f"{base}/health/live", timeout=30)
                live_s = time.monotonic() - started
                answers = [f.result() for f in stuck]
            after = httpx.get(f"{base}/coils", timeout=30)
    finally:
        engine.dispose()
    assert live.status_code == 200 and live_s < 1.5, f"liveness took {live_s:.1f} s"
    assert {r.status_code for r in answers} == {503}, {r.status_code for r in answers}
    assert answers[0].json()["detail"] == "database unavailable: no database connection came free in time"
    assert after.status_code == 200


def test_models_with_versions_and_latest_score(api: Api) -> None:
    with api.client() as client:
        models = client.get("/models").json()
        active = client.get("/models", params={"status": "active"}).json()
        retired = client.get("/models", params={"status": "retired"}).json()
        missing = client.get("/models/nope")
    (cnn,) = models
    assert cnn["active_version"] == 2 and [v["status"] for v in cnn["versions"]] == ["retired", "active"]
    assert cnn["versions"][1]["latest_performance"]["score"] == 0.75
    assert cnn["versions"][1]["validation"] == {"f1_nok": 0.81, "roc_auc": None}
    assert [v["version"] for v in active[0]["versions"]] == [2]
    assert [v["version"] for v in retired[0]["versions"]] == [1]
    assert retired[0]["active_version"] == 2  # the model's, whatever versions the filter shows (was null)
    assert missing.status_code == 404


def test_coils_are_filtered_and_paged_without_gaps_or_repeats(api: Api) -> None:
    seen: list[str] = []
    cursor = None
    with api.client() as client:
        while True:
            params = {"line": "galv-1", "limit": 4, **({"cursor": cursor} if cursor else {})}
            page = client.get("/coils", params=params).json()
            seen += [c["coil_id"] for c in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        noks = client.get("/coils", params={"status": "NOK", "limit": 500}).json()["items"]
        window = client.get(
            "/coils", params={"since": (T0 + timedelta(minutes=100)).isoformat(), "until": "2999-01-01T00:00:00Z"}
        ).json()["items"]
        bad_cursor = client.get("/coils", params={"cursor": "not-a-cursor"})
        forged = [  # times with no UTC equivalent: an OverflowError binding them was a 500
            client.get("/coils", params={"cursor": base64.urlsafe_b64encode(f"{at}|C-1".encode()).decode()})
            for at in ("0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00")
        ]
        bad_time = client.get("/coils", params={"since": "yesterday"})
        lines = [client.get("/coils", params={"line": line}) for line in ("Linie-Ä", "galv 1", "a/b", "L" * 65)]
        with_matrix = client.get("/coils/C-2026-000003", params={"matrix": "true"}).json()
        missing = client.get("/coils/C-2026-424242")
    expected = [f"C-2026-{i:06d}" for i in reversed(range(N_COILS)) if i % 3]
    assert seen == expected  # newest first, each exactly once
    assert {c["coil_id"] for c in noks} == {f"C-2026-{i:06d}" for i in range(0, N_COILS, 5)}
    assert len(window) == N_COILS - 10
    assert bad_cursor.status_code == 400 and "cursor" in bad_cursor.json()["detail"]
    assert [r.status_code for r in forged] == [400, 400]
    assert bad_time.status_code == 422
    # a line as the CoilMessage allows it (no coils on these), and what no CoilMessage could carry
    assert [r.status_code for r in lines] == [200, 200, 422, 422] and lines[0].json()["items"] == []
    rows = with_matrix["matrix"]
    assert len(rows) == 264 and len(rows[0]) == 18 and rows[0][0] is None and rows[0][1] == 140
    assert missing.status_code == 404 and "C-2026-424242" in missing.json()["detail"]


def test_a_coil_whose_stored_readings_are_cut_short_is_shown_without_them(api: Api) -> None:
    """A row written by hand (AssessCoils never stores less than a whole matrix): `matrix=true` was a 500."""
    row = {"coil_id": "C-CUT-1", "line": "galv-9", "status": "OK", "matrix": b"\x00\x00\x80"}
    with api.engine.begin() as conn:
        conn.execute(insert(Coil.__table__), [row])
    try:
        with api.client() as client:
            response = client.get("/coils/C-CUT-1", params={"matrix": "true"})
        assert response.status_code == 200, response.text
        assert response.json()["coil_id"] == "C-CUT-1" and response.json()["matrix"] is None
    finally:
        with api.engine.begin() as conn:
            conn.execute(delete(Coil.__table__).where(Coil.__table__.c.coil_id == "C-CUT-1"))


def test_drift_reports_and_their_html(api: Api) -> None:
    with api.client() as client:
        page = client.get("/drift-reports").json()
        newest, oldest = page["items"]
        detail = client.get(f"/drift-reports/{oldest['id']}").json()
        html = client.get(oldest["html_url"])
        escaped = client.get(newest["html_url"])
        missing = client.get("/drift-reports/999999")
    assert page["total"] == 2 and oldest["dataset_drift"] and oldest["drifted_columns"] == ["s03_mean"]
    assert detail["summary"]["columns"]["s03_mean"]["score"] == 0.001
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html") and "drift" in html.text
    assert "max-age=300" in html.headers["cache-control"] and html.headers["x-content-type-options"] == "nosniff"
    assert escaped.status_code == 404  # a report_uri outside REPORT_DIR is not served
    assert missing.status_code == 404


def test_metrics_and_no_page_that_needs_the_internet(api: Api) -> None:
    with api.client() as client:
        client.get("/status")
        metrics = client.get("/metrics")
        openapi = client.get("/openapi.json")
        docs, redoc = client.get("/docs"), client.get("/redoc")
        index = client.get("/").json()
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'coilguard_api_requests_total{method="GET",route="/status",status="200"}' in metrics.text
    assert "coilguard_coils_assessed_total" in metrics.text and "coilguard_feedback_total" in metrics.text
    assert openapi.status_code == 200 and "/feedback" in openapi.json()["paths"]
    assert docs.status_code == redoc.status_code == 404  # Swagger UI and ReDoc load scripts from a CDN
    assert index["endpoints"] == sorted(openapi.json()["paths"])  # was empty


# ----------------------------------------------------------------------------- property-based


SEMANTIC_REFUSALS = {"POST /feedback": 422, "GET /coils": 400}

# The document does not depend on the data: it is taken from an app over nothing (schemathesis' lazy
# fixture loader does not work with pytest 9), and every generated request goes to the live server.
schema = schemathesis.openapi.from_dict(
    create_app(load_settings(_env_file=None, database_url="sqlite://"), heartbeat=False).openapi()
)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_operation_fails_or_breaks_its_schema(case, api: Api) -> None:
    response = case.call(base_url=api.base, headers=AUTH)
    # Refusals no schema can express: feedback for a coil that was never assessed (422 on the coil id),
    # a cursor this API did not hand out (400). Everything else schema-valid must be accepted.
    semantic = response.status_code == SEMANTIC_REFUSALS.get(case.operation.label)
    case.validate_response(
        response, headers=AUTH, excluded_checks=[checks.positive_data_acceptance] if semantic else None
    )
