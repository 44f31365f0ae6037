"""The API application itself, in-process over a SQLite URL it never needs: its index, its error
answers (validation, a database that is away) and what its OpenAPI document promises."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError, InternalError, OperationalError, ProgrammingError

from services.api import create_app, queries
from services.api.app import MAX_BODY_BYTES
from services.config import ConfigError, load_settings
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.metrics import METRICS

TOKEN = "tok"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PASSWORD = "hunter2"


@pytest.fixture
def client() -> Iterator[TestClient]:
    url = f"postgresql+psycopg://coilguard:{PASSWORD}@127.0.0.1:1/coilguard"  # never connected to
    settings = load_settings(_env_file=None, database_url=url, api_token=TOKEN)
    engine = make_engine(url)
    with TestClient(create_app(settings, engine, heartbeat=False), raise_server_exceptions=False) as client:
        yield client
    engine.dispose()


def test_the_index_lists_every_documented_endpoint(client: TestClient) -> None:
    index = client.get("/").json()
    assert index["endpoints"] == sorted(client.get("/openapi.json").json()["paths"])
    assert {"/coils", "/coils/{coil_id}", "/feedback", "/status", "/models"} <= set(index["endpoints"])


@pytest.mark.parametrize(
    "body",
    [
        b'{"coil_id":"C-001","label":"NOK","operator":"an\\ud800na"}',
        b'{"coil_id":"C-001","label":"NOK","operator":"x","comment":"\\udfff"}',
    ],
)
def test_a_lone_surrogate_is_refused_with_the_usual_422(client: TestClient, body: bytes) -> None:
    # the default handler writes UTF-8 and could not encode the echoed input: a 500
    response = client.post("/feedback", content=body, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.content.isascii()
    (problem,) = response.json()["detail"]
    assert problem["type"] == "string_unicode" and problem["loc"][0] == "body"


def test_a_large_body_is_refused_before_the_token_is_looked_at(client: TestClient) -> None:
    """FastAPI parses a body before the token check: without a cap, anyone could have the API buffer any amount."""
    big = b'{"coil_id":"C-1","label":"OK","operator":"' + b"x" * (MAX_BODY_BYTES + 1) + b'"}'
    declared = client.post("/feedback", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413, declared.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    chunked = client.post("/feedback", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    small = client.post("/feedback", json={"coil_id": "C-1", "label": "OK", "operator": "anna"})
    assert small.status_code == 401  # within the cap: the token check answers as before


def test_validation_errors_keep_fastapis_shape(client: TestClient) -> None:
    response = client.post("/feedback", json={"coil_id": "C-1", "label": "ok", "operator": "Jürgen"}, headers=AUTH)
    assert response.status_code == 422
    assert response.json() == {
        "detail": [
            {
                "type": "literal_error",
                "loc": ["body", "label"],
                "msg": "Input should be 'OK' or 'NOK'",
                "input": "ok",
                "ctx": {"expected": "'OK' or 'NOK'"},
            }
        ]
    }


def test_a_body_that_is_not_json_is_a_422_as_documented(client: TestClient) -> None:
    json_body = {**AUTH, "content-type": "application/json"}
    not_json = client.post("/feedback", content=b"{bad", headers=json_body)
    not_text = client.post("/feedback", content=b"\x1aI\xff\xfeg", headers=json_body)
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["type"] == "json_invalid"
    assert not_text.status_code == 400  # FastAPI's "There was an error parsing the body"
    documented = client.get("/openapi.json").json()["paths"]["/feedback"]["post"]
    assert "not JSON" in documented["description"] and "422" in documented["responses"]
    assert "UTF-8" in documented["responses"]["400"]["description"]  # it said "The body is not JSON."


@pytest.mark.parametrize(("path", "method"), [("/coils", "get"), ("/status", "get"), ("/feedback", "post")])
def test_a_database_that_is_away_is_a_503_without_credentials(client: TestClient, path: str, method: str) -> None:
    body = {"coil_id": "C-1", "label": "OK", "operator": "anna"}
    response = client.request(method, path, headers=AUTH, **({"json": body} if method == "post" else {}))
    assert response.status_code == 503, response.text
    detail = response.json()["detail"]
    assert detail.startswith("database unavailable: ") and "127.0.0.1" in detail
    assert PASSWORD not in response.text


def test_a_lost_connection_is_a_503_and_other_database_errors_stay_500(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(exc: Exception) -> None:
        def raising(*_: object, **__: object) -> None:
            raise exc

        monkeypatch.setattr(queries, "model_versions", raising)

    fail(OperationalError("SELECT", {}, Exception(f"server closed the connection; password {PASSWORD}")))
    lost = client.get("/models")
    fail(IntegrityError("INSERT", {}, Exception("duplicate key")))
    bug = client.get("/models")
    assert lost.status_code == 503 and PASSWORD not in lost.text and "server closed" in lost.json()["detail"]
    assert bug.status_code == 500


def test_an_error_no_handler_answered_is_counted_as_the_500_it_became(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request metric saw only the requests that came back with a response: an alert on the API's error rate
    would never have fired. A made-up method is counted as "other", not as a series of its own."""

    def count(method: str, status: str) -> float:
        return METRICS.api_requests.labels(method, "/models", status)._value.get()

    def raising(*_: object, **__: object) -> None:
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    before = count("GET", "500")
    monkeypatch.setattr(queries, "model_versions", raising)
    assert client.get("/models").status_code == 500
    assert count("GET", "500") == before + 1
    brewed = METRICS.api_requests.labels("other", "/health/live", "405")
    other = brewed._value.get()
    assert client.request("BREW", "/health/live").status_code == 405
    assert brewed._value.get() == other + 1 and 'method="BREW"' not in client.get("/metrics").text


class _DriverError(Exception):
    """What psycopg raises, as far as the API looks: the server's SQLSTATE."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "status", "words"),
    [
        (
            InternalError("INSERT", {}, _DriverError("cannot execute INSERT in a read-only transaction", "25006")),
            503,
            "read-only transaction",
        ),
        (
            OperationalError(
                "SELECT", {}, _DriverError("terminating connection due to administrator command", "57P01")
            ),
            503,
            "administrator command",
        ),
        (ProgrammingError("SELECT", {}, _DriverError('syntax error at or near "SELEC"', "42601")), 500, None),
    ],
    ids=["read-only", "shutting-down", "a-bug"],
)
def test_the_databases_own_code_says_whether_it_is_unavailable(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, error: Exception, status: int, words: str | None
) -> None:
    def raising(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr(queries, "model_versions", raising)
    response = client.get("/models")
    assert response.status_code == status, response.text
    if words is not None:
        assert words in response.json()["detail"]


def test_readiness_waits_for_this_releases_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An API started before the migration ran must not be put in service while every route fails, and says why
    a route fails. Once the schema is at this release's, a missing table is a fault of the code: a 500, not a
    503 that would have clients wait for an upgrade that changes nothing."""

    def raising(*_: object, **__: object) -> None:
        raise ProgrammingError("SELECT", {}, _DriverError('relation "coils" does not exist', "42P01"))

    monkeypatch.setattr(queries, "model_versions", raising)
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    settings = load_settings(_env_file=None, database_url=url, api_token=TOKEN)
    engine = make_engine(url)
    with TestClient(create_app(settings, engine, heartbeat=False), raise_server_exceptions=False) as client:
        before, route_before = client.get("/health/ready"), client.get("/models")
        upgrade(url)
        after, route_after = client.get("/health/ready"), client.get("/models")
    engine.dispose()
    assert before.status_code == 503, before.text
    assert "schema revision none" in before.json()["checks"]["database"]["detail"]
    assert route_before.status_code == 503 and "revision none, behind this release" in route_before.json()["detail"]
    assert after.status_code == 200, after.text
    assert route_after.status_code == 500


def test_an_api_token_that_no_client_could_send_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match=r"COILGUARD_API_TOKEN: .*printable ASCII"):
        load_settings(_env_file=None, api_token="päss")


def test_the_engine_the_api_made_is_disposed_at_shutdown_one_handed_in_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`coilguard api` made its engine and never disposed of it: the pooled connections stayed open on the
    server until the process ended. `coilguard up` hands in the engine its worker shares: that one stays."""
    from services.api import app as api_app

    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    settings = load_settings(_env_file=None, database_url=url)
    disposed: list[str] = []
    made = make_engine(url)
    made.dispose = lambda *a, **k: disposed.append("made")  # type: ignore[method-assign]
    monkeypatch.setattr(api_app, "make_engine", lambda *a, **k: made)
    with TestClient(create_app(settings, heartbeat=False)) as client:
        assert client.get("/status").status_code == 200
    assert disposed == ["made"]
    shared = make_engine(url)
    shared.dispose = lambda *a, **k: pytest.fail("the shared engine was disposed")  # type: ignore[method-assign]
    with TestClient(create_app(settings, shared, heartbeat=False)) as client:
        assert client.get("/status").status_code == 200
    type(made).dispose(made)
    type(shared).dispose(shared)
