"""Drift reports as a workflow: the reference (a sample of the active models' training data) and the coils of the
last window come from a :class:`DriftSource`, the comparison is :func:`ml.drift_compare.compare` (Evidently, per
feature and overall; what it measures and why is said there), and the report goes to a :class:`DriftReportStore`.
A window with too few coils, or no reference kept, is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from ml.drift_compare import CoilSample, DriftConfig, DriftResult, compare


class DriftSource(Protocol):
    def reference(self) -> CoilSample | None:
        """The active models' training data (with predictions when available), or None when none is kept."""

    def current(self, start: datetime, end: datetime) -> CoilSample:
        """Coils received in [start, end), with their p_nok and the operators' latest labels."""


class DriftReportStore(Protocol):
    def save(self, *, window_start: datetime, window_end: datetime, result: DriftResult, summary: dict) -> int:
        """Keep the HTML and the JSON summary, record one ``drift_reports`` row; return its id."""


@dataclass
class DriftOutcome:
    status: str  # "drift", "no drift" or "skipped"
    reason: str
    window_start: datetime
    window_end: datetime
    report_id: int | None = None
    result: DriftResult | None = None

    def describe(self) -> str:
        head = f"drift report #{self.report_id}: " if self.report_id is not None else "drift report: "
        return head + f"{self.status} ({self.reason})"


def run_drift_report(
    source: DriftSource,
    store: DriftReportStore,
    *,
    now: datetime,
    window: timedelta,
    config: DriftConfig | None = None,
) -> DriftOutcome:
    """Compare the coils of the last ``window`` with the reference and store the report."""
    config = config or DriftConfig()
    start, end = now - window, now
    reference = source.reference()
    if reference is None or len(reference) == 0:
        return DriftOutcome(
            "skipped", "no reference: no active model has its training data under MODEL_DIR/data", start, end
        )
    current = source.current(start, end)
    if len(current) < config.min_coils:
        return DriftOutcome(
            "skipped", f"{len(current)} coils in the window, at least {config.min_coils} needed", start, end
        )
    result = compare(reference, current, config)
    summary = {
        **result.summary(),
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "reference": reference.description,
        "current": {**current.description, "n_labelled": current.n_labelled()},
    }
    report_id = store.save(window_start=start, window_end=end, result=result, summary=summary)
    status = "drift" if result.dataset_drift else "no drift"
    reason = (
        f"{len(result.drifted_columns)} of {len(result.columns)} columns drifted "
        f"({result.share_drifted:.0%}, threshold {config.drift_share:.0%})"
    )
    return DriftOutcome(status, reason, start, end, report_id, result)


def describe_columns(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
