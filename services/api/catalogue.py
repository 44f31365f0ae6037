"""``/models``: every registered model, its versions, their life cycle and latest ModelScore."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query

from services.api import queries
from services.api.deps import State
from services.api.schemas import Error, ModelOut

router = APIRouter(tags=["models"])

ModelStatus = Literal["candidate", "active", "retired", "failed"]


@router.get("/models", response_model=list[ModelOut], summary="Models with their versions and latest score")
def list_models(
    state: State,
    status: Annotated[ModelStatus | None, Query(description="Only versions in this state.")] = None,
) -> list[dict]:
    return queries.model_versions(state.engine, status=status)


@router.get(
    "/models/{name}",
    response_model=ModelOut,
    summary="One model's versions",
    responses={404: {"model": Error, "description": "No model of that name."}},
)
def get_model(state: State, name: Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,128}$")]) -> dict:
    found = queries.model_versions(state.engine, name=name)
    if not found:
        raise HTTPException(404, f"no model named {name!r}")
    return found[0]
