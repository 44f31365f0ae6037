"""``/coils`` and ``/feedback``: decided coils for dashboards, operator verdicts from plant tools."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from fastapi.exceptions import RequestValidationError

from services.api import queries
from services.api.deps import WRITE_ERRORS, State, require_token
from services.api.schemas import (
    COIL_ID_PATTERN,
    LINE_PATTERN,
    CoilDetail,
    CoilPage,
    Error,
    FeedbackIn,
    FeedbackOut,
    UtcTime,
)
from services.db.repositories import SqlFeedbackStore
from services.metrics import METRICS
from workflows.ports import UnknownCoil

log = logging.getLogger(__name__)
router = APIRouter(tags=["coils"])

MAX_PAGE = 500


@router.get(
    "/coils",
    response_model=CoilPage,
    summary="Coils, newest first, filtered by line, status and time",
    responses={400: {"model": Error, "description": "A cursor this API did not hand out."}},
)
def list_coils(
    state: State,
    line: Annotated[str | None, Query(pattern=LINE_PATTERN, description="Line name, e.g. galv-1.")] = None,
    status: Annotated[Literal["pending", "OK", "NOK"] | None, Query(description="Decision.")] = None,
    since: Annotated[UtcTime | None, Query(description="Received at or after (ISO 8601).")] = None,
    until: Annotated[UtcTime | None, Query(description="Received before (ISO 8601).")] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> CoilPage:
    try:
        rows, next_cursor = queries.coil_page(
            state.engine, line=line, status=status, since=since, until=until, cursor=cursor, limit=limit
        )
    except queries.BadCursor as exc:
        raise HTTPException(400, str(exc)) from None
    return CoilPage(items=rows, limit=limit, next_cursor=next_cursor)


@router.get(
    "/coils/{coil_id}",
    response_model=CoilDetail,
    summary="One coil with its votes and operator feedback",
    responses={404: {"model": Error, "description": "No such coil."}},
)
def get_coil(
    state: State,
    coil_id: Annotated[str, Path(pattern=COIL_ID_PATTERN)],
    matrix: Annotated[bool, Query(description="Include the 264 × 18 sensor matrix.")] = False,
) -> dict:
    detail = queries.coil_detail(state.engine, coil_id, with_matrix=matrix)
    if detail is None:
        raise HTTPException(404, f"no coil {coil_id!r} has been assessed")
    return detail


@router.post(
    "/feedback",
    response_model=FeedbackOut,
    status_code=status.HTTP_201_CREATED,
    summary="An operator's verdict on a coil (the latest verdict for a coil wins)",
    dependencies=[Depends(require_token)],
    responses={
        400: {"model": Error, "description": "The body is not UTF-8 text, so it cannot be read."},
        **WRITE_ERRORS,
    },
    description="422 when the coil is unknown (never assessed), the label is not OK/NOK, the operator is blank, "
    "or the body is malformed or not JSON at all (`json_invalid`); `detail` names the field and the reason.",
)
def post_feedback(state: State, body: FeedbackIn) -> dict:
    try:
        feedback_id = SqlFeedbackStore(state.engine).add(body.coil_id, body.label, body.operator, body.comment)
    except UnknownCoil as exc:  # the standard validation-error shape, pointing at the field at fault
        raise RequestValidationError(
            [{"loc": ("body", "coil_id"), "msg": str(exc), "type": "unknown_coil", "input": body.coil_id}]
        ) from None
    METRICS.feedback.labels(body.label, "api").inc()
    log.info(
        "feedback: %s is %s according to %s",
        body.coil_id,
        body.label,
        body.operator,
        extra={"coil_id": body.coil_id, "label": body.label, "operator": body.operator},
    )
    return queries.feedback_row(state.engine, feedback_id)
