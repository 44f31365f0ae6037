"""What every route needs: the settings, the database engine, and the bearer-token guard for writes."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Generic, TypeVar

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from services.api.schemas import Check, Error
from services.config import Settings

T = TypeVar("T")

BROKER_CHECK_EVERY_S = 10.0


class Cached(Generic[T]):
    """The last answer of a slow check, reused for ``ttl_s`` seconds: ``/status`` asks the broker with a
    fresh MQTT connection (up to 3 s when it is away, and the endpoint needs no token), so polling it
    must not open a connection per request nor hold a worker thread per request while the broker is away.

    One caller at a time refreshes an expired answer; the others meanwhile get the previous answer, and
    wait only for the very first one."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._refreshing = threading.Lock()
        self._held: tuple[float, T] | None = None  # (when it was answered, the answer): replaced whole

    def get(self, compute: Callable[[], T]) -> T:
        held = self._held
        if held is not None and self._fresh(held):
            return held[1]
        if not self._refreshing.acquire(blocking=held is None):
            assert held is not None  # a blocking acquire always succeeds
            return held[1]
        try:
            held = self._held
            if held is None or not self._fresh(held):  # another caller may have refreshed it meanwhile
                answer = compute()
                held = self._held = (self._clock(), answer)
            return held[1]
        finally:
            self._refreshing.release()

    def _fresh(self, held: tuple[float, T]) -> bool:
        return self._clock() - held[0] < self._ttl_s


@dataclass
class ApiState:
    settings: Settings
    engine: Engine
    broker: Cached[Check] = field(default_factory=lambda: Cached(BROKER_CHECK_EVERY_S))


def api_state(request: Request) -> ApiState:
    return request.app.state.coilguard


State = Annotated[ApiState, Depends(api_state)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <COILGUARD_API_TOKEN>`")


def require_token(state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Writes need the configured token; with none configured, writes are refused rather than open."""
    configured = state.settings.api_token.get_secret_value() if state.settings.api_token else ""
    if not configured:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "writes are disabled: COILGUARD_API_TOKEN is not set on the API server",
        )
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing token: send `Authorization: Bearer <COILGUARD_API_TOKEN>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(credentials.credentials.encode(), configured.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong token", headers={"WWW-Authenticate": "Bearer"})


WRITE_ERRORS = {
    401: {"model": Error, "description": "No token, or the wrong one."},
    503: {"model": Error, "description": "The server has no API token configured, so it accepts no writes."},
}
