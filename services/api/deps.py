"""What every route needs: the settings, the database engine, and the bearer-token guard for writes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from services.api.schemas import Error
from services.config import Settings


@dataclass
class ApiState:
    settings: Settings
    engine: Engine


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
