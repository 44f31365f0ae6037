"""``coilguard up``: the whole system in one process on one machine.

The embedded broker (when ``MQTT_URL=embedded``), the AssessCoils worker, the scheduler (score,
retrain, drift reports) and the REST API, over the configured database (migrated on start: on one
machine nobody else runs ``db upgrade``). It serves whatever models are registered; with none, it
says how to train one, and AssessCoils, subscribed meanwhile, starts assessing once one is registered.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

import uvicorn
from sqlalchemy import Engine

from services.api import create_app
from services.config import Settings
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.repositories import SqlModelRegistry
from services.heartbeat import Heartbeat
from services.runtime import broker_for
from services.scheduler import Scheduler, build_scheduler, scheduler_heartbeat
from services.signals import exit_at_once, exit_at_once_on_interrupt
from services.workers.assess import AssessWorker

log = logging.getLogger(__name__)

RETRY_S = 10.0  # after the database or the broker failed AssessCoils in `up`
NO_MODELS = (
    "no active model is registered, so no coil can be assessed yet. Train and register one, e.g.\n"
    "    coilguard train --assessor cnn --data sim:1500 --register\n"
    "(`coilguard models --kinds` lists the assessors; `coilguard demo` runs the whole loop with its own models).\n"
    "AssessCoils is subscribed already: coils sent meanwhile wait (in the broker, or with the embedded one in the "
    "worker) and are assessed as soon as a model is registered."
)


class AssessThread:
    """Runs the AssessCoils worker on a thread, and runs it again after an outage.

    The worker subscribes at once and waits for the first model itself, so that the broker keeps the
    coils of a fresh install for it (the embedded broker keeps no session: a restarted worker has lost what the
    failed one held, see services/mqtt/broker.py). An outage (the database not there yet, the broker refusing the
    worker) is logged and tried again after ``RETRY_S``: the thread must not end for good while the API
    and the scheduler of the same process keep running as if nothing were missing.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings, self.engine = settings, engine
        self.worker: AssessWorker | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a worker is never created after stop() has looked for one
        self._thread = threading.Thread(target=self._run, name="assess", daemon=True)

    def start(self) -> AssessThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self.worker = AssessWorker(self.settings, engine=self.engine)
                self.worker.run()
                return
            except Exception:
                log.exception("AssessCoils could not run; trying again in %.0f s", RETRY_S)
                self._stop.wait(RETRY_S)

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        if self.worker is not None:
            self.worker.stop()
        self._thread.join(60)


def run_up(settings: Settings, say: Callable[[str], None] = print) -> None:
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    with broker_for(settings, host_embedded=True) as url:
        assess = AssessThread(settings, engine).start()
        scheduler: Scheduler | None = None
        heartbeat: Heartbeat | None = None
        server: uvicorn.Server | None = None
        try:  # from here a Ctrl-C, during the start-up too, stops what has started
            if not SqlModelRegistry(engine).active_models():
                say(NO_MODELS)
            scheduler = build_scheduler(settings)
            heartbeat = scheduler_heartbeat(settings, scheduler)
            scheduler.start_in_thread()
            app = create_app(settings, engine)
            server = uvicorn.Server(
                uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_config=None)
            )
            base = f"http://{settings.api_host}:{settings.api_port}"
            say(
                f"coilguard up: broker {url.redacted()}, database {engine.url.render_as_string(hide_password=True)}\n"
                f"  API {base}  (OpenAPI {base}/openapi.json, status {base}/status, metrics {base}/metrics)\n"
                f"  drift reports in {settings.report_dir / 'drift'} and at {base}/drift-reports\n"
                "  Ctrl-C stops everything."
            )
            # uvicorn handles SIGINT/SIGTERM while it runs and raises the signal again once it has stopped;
            # with these (do-nothing) handlers in place that second delivery lets the shutdown below run
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: None)
            server.run()  # until SIGINT/SIGTERM
        finally:
            if server is not None and server.force_exit:  # uvicorn took a second Ctrl-C during its shutdown
                exit_at_once()
            exit_at_once_on_interrupt()
            # logged, not said: under `… | tee up.log` the first Ctrl-C has ended the reader, and a print would
            # raise here and skip the stops below
            log.info("stopping (a ReTrain in progress finishes its epoch first); Ctrl-C again stops at once")
            if scheduler is not None:
                scheduler.stop(wait=True)  # the heartbeat row stays while a job finishes its epoch
            if heartbeat is not None:
                heartbeat.stop()
            assess.stop()
            engine.dispose()
