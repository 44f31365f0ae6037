"""What the REST API reads and writes: the OpenAPI document is generated from these models.

Times are ISO 8601 in UTC (``2026-01-05T06:00:00Z``). Identifiers follow DESIGN §3 (coil ids are 1–64
characters of ``[A-Za-z0-9._-]``), so a malformed id is refused with 422 before it reaches SQL.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from workflows.messages import LINE_PATTERN as LINE_PATTERN_RE

COIL_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
LINE_PATTERN = f"^{LINE_PATTERN_RE.pattern}$"  # the CoilMessage's rule: "Linie-Ä" is a line
CoilId = Annotated[str, StringConstraints(pattern=COIL_ID_PATTERN)]
Label = Literal["OK", "NOK"]


def _printable(value: str) -> str:
    """Comments end up in SQL text columns and log lines: no control characters but line breaks and tabs."""
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value) or "\x7f" in value:
        raise ValueError("must not contain control characters")
    return value


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: object) -> object:
    """Only what the document promises (RFC 3339 ``date-time``, with its offset), not pydantic's lax extras:
    a bare number would otherwise be read as seconds since 1970."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):  # match: "$" passes a final newline
        raise ValueError("expected an ISO 8601 time with its offset, e.g. 2026-01-05T06:00:00Z")
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 with a positive offset
        raise ValueError("time out of range") from None


# Constraints are listed before the printable check: placed after a validator function, pydantic
# checks the length of the untrimmed text, so "   " passed as one character and was stored as "".
def _one_line_name(value: str) -> str:
    """An operator's name is one line of visible text: a line break would forge a log line, and invisible
    characters (a zero-width space, C1 controls) would let one person appear as two who look the same."""
    if any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in value):
        raise ValueError("must be one line of visible characters (no line breaks, tabs or invisible characters)")
    return value


OperatorName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128), AfterValidator(_one_line_name)
]
Comment = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_printable)]
UtcTime = Annotated[datetime, BeforeValidator(_rfc3339), AfterValidator(_utc)]


class Error(BaseModel):
    detail: str = Field(description="Why the request was refused.")


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Check(BaseModel):
    ok: bool
    detail: str
    took_ms: float


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, Check]


class WorkerOut(BaseModel):
    worker_id: str
    kind: str
    host: str
    pid: int
    started_at: datetime
    seen_at: datetime
    alive: bool = Field(description="Seen within three heartbeat intervals.")
    info: dict[str, Any] = Field(default_factory=dict, description="What the worker reports: counters, backlog, …")


class ModelRef(BaseModel):
    id: int
    name: str
    kind: str
    version: int
    promoted_at: datetime | None


class Backlog(BaseModel):
    pending_coils: int = Field(description="Coils stored without a decision.")
    queued_in_workers: int = Field(description="Messages received by live AssessCoils workers, not yet assessed.")
    unannounced_decisions: int = Field(
        description="Decisions stored more than ANNOUNCE_AFTER ago that have not reached the broker (its ACL refused "
        "them, or a broker session holding them was lost); the scheduler offers those up to ANNOUNCE_MAX_AGE old "
        "again every ANNOUNCE_EVERY (unless off), `coilguard announce` any."
    )


class SystemStatus(BaseModel):
    now: datetime
    workers: list[WorkerOut]
    alive: dict[str, int] = Field(description="Live workers per kind.")
    last_decision_at: datetime | None
    coils_last_24h: int
    backlog: Backlog
    active_models: list[ModelRef]
    broker: Check = Field(
        description="A short MQTT connect to the workers' broker, which the API itself never needs; "
        "the answer is reused for 10 s, so polling opens no connection per request."
    )


class Performance(BaseModel):
    computed_at: datetime
    window_start: datetime | None
    window_end: datetime | None
    n_coils: int
    n_correct: int
    score: float | None
    precision_nok: float | None
    recall_nok: float | None
    below_threshold: bool


class ModelVersion(BaseModel):
    id: int
    version: int
    status: str
    created_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None
    parent_id: int | None
    validation: dict[str, Any] | None = Field(description="Validation metrics recorded at training time.")
    latest_performance: Performance | None = Field(description="The newest ModelScore row of this version.")


class ModelOut(BaseModel):
    name: str
    kind: str
    active_version: int | None = Field(description="The version serving now, whatever `status` filters out.")
    versions: list[ModelVersion]


class CoilOut(BaseModel):
    coil_id: str
    line: str
    status: str
    produced_at: datetime | None
    received_at: datetime
    decided_at: datetime | None
    p_nok: float | None
    confidence: float | None
    operator_label: Label | None = Field(description="The latest operator feedback, if any.")


class CoilPage(BaseModel):
    items: list[CoilOut]
    limit: int
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last page.")


class VoteOut(BaseModel):
    model: str
    version: int
    model_id: int
    label: str
    p_nok: float | None
    confidence: float | None
    created_at: datetime


class FeedbackOut(BaseModel):
    id: int
    coil_id: str
    label: Label
    operator: str | None
    comment: str | None
    created_at: datetime


class CoilDetail(CoilOut):
    product: dict[str, Any] | None
    votes: list[VoteOut]
    feedback: list[FeedbackOut] = Field(description="Oldest first; the last one is the operator's verdict.")
    matrix: list[list[float | None]] | None = Field(
        None,
        description="264 sections × 18 sensors in g/m² (null = dropped reading), with `matrix=true`; null where "
        "the stored readings are not a whole matrix (a row written by hand).",
    )


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coil_id: CoilId
    label: Label
    operator: OperatorName = Field(description="Who checked the coil; surrounding blanks are trimmed.")
    comment: Comment | None = None


class DriftReportOut(BaseModel):
    id: int
    created_at: datetime
    window_start: datetime
    window_end: datetime
    dataset_drift: bool
    share_drifted: float | None
    html_url: str | None = Field(description="The Evidently report, self-contained HTML.")
    drifted_columns: list[str] = Field(default_factory=list)


class DriftReportDetail(DriftReportOut):
    summary: dict[str, Any] | None


class DriftReportPage(BaseModel):
    items: list[DriftReportOut]
    limit: int
    offset: int
    total: int
