"""Prometheus metrics of every coilguard process (scraped from ``/metrics``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from workflows.assess import BatchResult

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5)


class _Metrics:
    def __init__(self) -> None:
        self.coils_assessed = Counter("coilguard_coils_assessed_total", "Coils decided", ["line", "decision"])
        self.coils_rejected = Counter("coilguard_coils_rejected_total", "Messages rejected as malformed")
        self.coils_duplicate = Counter("coilguard_coils_duplicate_total", "Coil ids already decided (redelivered)")
        self.publish_refused = Counter(
            "coilguard_publish_refused_total",
            "Messages the broker refused (its ACL): decisions (held back and offered again), rejections, or decisions "
            "given up by a worker",
            ["kind"],
        )
        self.announced_late = Counter(
            "coilguard_decisions_announced_late_total",
            "Stored decisions announced after their worker could not (the scheduler's announce, `coilguard announce`)",
        )
        self.unannounced = Gauge(
            "coilguard_decisions_unannounced",
            "Stored decisions older than ANNOUNCE_AFTER that have not reached the broker, after the last announce pass",
        )
        self.coils_qos0 = Counter(
            "coilguard_coils_qos0_total",
            "Coils a gateway sent at QoS 0 against the contract's QoS 1: taken, or dropped while the worker was behind",
            ["outcome"],
        )
        self.batch_size = Histogram(
            "coilguard_assess_batch_size", "Messages per AssessCoils batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.batch_seconds = Histogram("coilguard_assess_batch_seconds", "Time to assess, store and publish a batch")
        self.latency = Histogram(
            "coilguard_decision_latency_seconds", "Receipt to decision, per coil", buckets=_LATENCY_BUCKETS
        )
        self.votes = Counter("coilguard_model_votes_total", "Votes cast", ["model", "version", "label"])
        self.db_retries = Counter("coilguard_db_retries_total", "Database operations retried during an outage")
        self.refused_reloads = Counter(
            "coilguard_refused_reloads_total",
            "Registry changes the worker could not load (the previous ensemble served)",
        )
        self.retrain_runs = Counter("coilguard_retrain_runs_total", "ReTrain runs by outcome", ["model", "status"])
        self.retrain_seconds = Histogram(
            "coilguard_retrain_seconds",
            "ReTrain run duration",
            ["model"],
            buckets=(10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.score = Gauge(
            "coilguard_model_score", "Latest ModelScore of the active version (NaN until it has feedback)", ["model"]
        )
        self.below_rule_seconds = Gauge(
            "coilguard_model_below_score_rule_seconds",
            "How long the active version's ModelScore has broken the score rule without a break, from its rows in "
            "mperformance (0 when it does not); survives a restart, unlike a `for:` on the score",
            ["model"],
        )
        # the label is `task`, not `job`: Prometheus sets `job` on every scraped series itself, and would rename ours
        self.job_runs = Counter(
            "coilguard_scheduler_job_runs_total",
            "Runs of the scheduler's jobs by outcome (done, failed)",
            ["task", "outcome"],
        )
        self.job_failures_in_a_row = Gauge(
            "coilguard_scheduler_job_failures_in_a_row",
            "Runs of a scheduler job that failed since its last run that did not (0 from the scheduler's start)",
            ["task"],
        )
        self.feedback = Counter("coilguard_feedback_total", "Operator verdicts received", ["label", "source"])
        self.drift_reports = Counter("coilguard_drift_reports_total", "Drift report runs by outcome", ["outcome"])
        self.drift_share = Gauge("coilguard_drift_share", "Share of drifted features in the latest drift report")
        self.drift_seconds = Histogram(
            "coilguard_drift_report_seconds", "Time to build a drift report", buckets=(1, 5, 10, 30, 60, 120, 300)
        )
        self.api_requests = Counter("coilguard_api_requests_total", "REST API requests", ["method", "route", "status"])
        self.api_seconds = Histogram("coilguard_api_request_seconds", "REST API request duration", ["route"])

    def observe_batch(self, result: BatchResult, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.coils_rejected.inc(len(result.rejected))
        self.coils_duplicate.inc(len(result.duplicates))
        for decision in result.decided:
            self.coils_assessed.labels(decision.line, decision.decision).inc()
            self.latency.observe(decision.latency_ms / 1000.0)
            for vote in decision.votes:
                self.votes.labels(vote.model, str(vote.version), vote.label).inc()


METRICS = _Metrics()


_SERVED: set[int] = set()

Probe = Callable[[], str | None]  # None: fine; otherwise why not, for the probe's body and `kubectl describe`
_PROBES: dict[str, Probe] = {}


def set_probes(*, live: Probe | None = None, ready: Probe | None = None) -> None:
    """What ``/health/live`` and ``/health/ready`` on the metrics port report (a process that set none answers
    200 to both: it is up). ``coilguard up`` runs AssessCoils again in the same process: the new worker's probes
    replace the old one's."""
    for name, probe in (("live", live), ("ready", ready)):
        if probe is None:
            _PROBES.pop(name, None)
        else:
            _PROBES[name] = probe


def serve_metrics(port: int) -> None:
    """Expose this process's metrics on ``:port/metrics`` and its probes on ``/health/live`` and ``/health/ready``
    (workers and the scheduler; the API has its own).

    The probes are what Kubernetes restarts or routes by: ``/metrics`` answers as soon as the process is up,
    also while its worker waits for a model that never loads or after its loop hung, and a rollout judged by it
    would move on from pod to pod onto the same fault.

    Once per port: ``coilguard up`` starts AssessCoils again after an outage, in the same process.
    """
    if port and port not in _SERVED:
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True  # a scrape in progress does not hold the process at exit

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                """Not a line on stderr per scrape and probe."""

        server = make_server("0.0.0.0", port, _with_probes(make_wsgi_app()), Server, Quiet)
        threading.Thread(target=server.serve_forever, name=f"metrics-{port}", daemon=True).start()
        _SERVED.add(port)


def _with_probes(metrics: Callable) -> Callable:
    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/health/live", "/health/ready"):
            return metrics(environ, start_response)
        probe = _PROBES.get(path.rsplit("/", 1)[1])
        try:
            why = probe() if probe is not None else None
        except Exception as exc:  # a probe that fails says so, as a failed probe
            why = f"the probe failed: {type(exc).__name__}: {exc}"
        start_response("200 OK" if why is None else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [(why or "ok").encode() + b"\n"]

    return app
