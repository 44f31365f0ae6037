"""``/drift-reports``: the Evidently drift reports, as a list and as the self-contained HTML itself."""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse
from sqlalchemy import Row

from services.api import queries
from services.api.deps import State
from services.api.schemas import DriftReportDetail, DriftReportPage, Error

router = APIRouter(tags=["drift"])

ReportId = Annotated[int, Path(ge=1, le=2**63 - 1)]
# a report never changes, but its URL holds only its id, which a recreated database hands out again: a short
# max-age spares the 3.5 MB on quick revisits without showing another database's report for long
CACHED = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
NOT_FOUND = {404: {"model": Error, "description": "No such report (or its file is gone)."}}


def _out(row: Row, detail: bool = False) -> dict[str, Any]:
    summary = queries.finite(row.summary or {})
    out = {
        "id": row.id,
        "created_at": row.created_at,
        "window_start": row.window_start,
        "window_end": row.window_end,
        "dataset_drift": row.dataset_drift,
        "share_drifted": queries.finite(row.share_drifted),
        "html_url": f"/drift-reports/{row.id}/html" if row.report_uri else None,
        "drifted_columns": list(summary.get("drifted_columns") or []),
    }
    if detail:
        out["summary"] = summary
    return out


@router.get("/drift-reports", response_model=DriftReportPage, summary="Drift reports, newest first")
def list_reports(
    state: State,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> DriftReportPage:
    rows, total = queries.drift_report_page(state.engine, limit, offset)
    return DriftReportPage(items=[_out(r) for r in rows], limit=limit, offset=offset, total=total)


@router.get(
    "/drift-reports/{report_id}",
    response_model=DriftReportDetail,
    summary="One drift report's summary (per-feature scores)",
    responses=NOT_FOUND,
)
def get_report(state: State, report_id: ReportId) -> dict[str, Any]:
    row = queries.drift_report(state.engine, report_id)
    if row is None:
        raise HTTPException(404, f"no drift report #{report_id}")
    return _out(row, detail=True)


@router.get(
    "/drift-reports/{report_id}/html",
    summary="The Evidently report itself (opens offline: scripts and fonts are inlined)",
    response_class=FileResponse,
    responses={200: {"content": {"text/html": {}}, "description": "The HTML report."}, **NOT_FOUND},
)
def report_html(state: State, report_id: ReportId) -> FileResponse:
    row = queries.drift_report(state.engine, report_id)
    if row is None or not row.report_uri:
        raise HTTPException(404, f"no drift report #{report_id}")
    path = _inside(state.settings.report_dir, row.report_uri)
    if path is None or not path.is_file():
        raise HTTPException(404, f"the file of drift report #{report_id} is missing from the report store")
    return FileResponse(path, media_type="text/html", headers=CACHED)


def _inside(root: FilePath, uri: str) -> FilePath | None:
    """The report file under REPORT_DIR; a URI pointing elsewhere (``..``, absolute) is not served, nor
    one no file can have: a NUL byte (SQLite stores it) made the path calls raise ValueError, a 500."""
    if "\x00" in uri:
        return None
    base = FilePath(root).resolve()
    path = (base / uri).resolve()
    return path if path.is_relative_to(base) else None
