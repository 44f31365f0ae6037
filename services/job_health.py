"""How the scheduler's jobs are doing: counted for Prometheus, and a hung one for ``/health/live``.

A job that fails is logged and tried again at its next time: one bad pass must not stop the scheduler. But
without more, a ModelScore that fails at every pass (a grant revoked, a table locked by a migration left
open) or that waits forever on a row an operator's ``psql`` session holds would be seen by nobody: the
scores simply stop moving, and with them the alerts and ReTrain that read them. So each run's outcome is
counted, the failures in a row are a gauge an alert reads, and a job meant to take seconds that has run past
:data:`HUNG_AFTER` makes the liveness probe fail: Kubernetes restarts the scheduler, which closes its
connections, instead of leaving it waiting. Long jobs (ReTrain, the drift reports) have no such bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from services.metrics import METRICS

log = logging.getLogger(__name__)

T = TypeVar("T")

# Jobs whose runs take seconds (ModelScore: 13 s once after an edit of a million counted rows; the announce pass:
# a few hundred decisions), and how long one may run before the scheduler counts as hung.
HUNG_AFTER: dict[str, timedelta] = {"score": timedelta(minutes=30), "announce": timedelta(minutes=30)}


class JobWatch:
    """Wraps the scheduler's jobs (:meth:`guard`) and answers the liveness probe (:meth:`hung`)."""

    def __init__(self, hung_after: dict[str, timedelta] | None = None, clock: Callable[[], float] = time.monotonic):
        self.hung_after = HUNG_AFTER if hung_after is None else hung_after
        self.clock = clock
        self._lock = threading.Lock()
        self._running: dict[str, float] = {}  # job name -> when its run began (clock)
        self._failures: dict[str, int] = {}

    def guard(self, name: str, job: Callable[..., T]) -> Callable[..., None]:
        """``job`` as the scheduler runs it: a failure is logged and counted, never raised (the next time runs)."""
        METRICS.job_failures_in_a_row.labels(name).set(0)  # the series exists, at 0, from the start

        def run(*args: object, **kwargs: object) -> None:
            log.info("job %s starting", name)
            with self._lock:
                self._running[name] = self.clock()
            try:
                job(*args, **kwargs)
            except Exception:
                log.exception("job %s failed", name)
                self._ended(name, failed=True)
            else:
                log.info("job %s done", name)
                self._ended(name, failed=False)

        return run

    def _ended(self, name: str, *, failed: bool) -> None:
        with self._lock:
            self._running.pop(name, None)
            self._failures[name] = self._failures.get(name, 0) + 1 if failed else 0
            in_a_row = self._failures[name]
        METRICS.job_runs.labels(name, "failed" if failed else "done").inc()
        METRICS.job_failures_in_a_row.labels(name).set(in_a_row)

    def hung(self) -> str | None:
        """None while every bounded job that is running is within its bound; otherwise which is not, and for how
        long it has run (the probe's answer)."""
        now = self.clock()
        with self._lock:
            running = dict(self._running)
        late = [
            f"job {name} has run for {now - began:.0f} s (more than {self.hung_after[name].total_seconds():.0f} s)"
            for name, began in sorted(running.items())
            if name in self.hung_after and now - began > self.hung_after[name].total_seconds()
        ]
        return "; ".join(late) or None
