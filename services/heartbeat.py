"""Heartbeats: each long-running process keeps its row in ``workers`` fresh, for the API's status page.

A row not seen for three intervals belongs to a process that is gone (killed, node lost); a clean
shutdown removes its row. A dead process's row stays on the status page for ``FORGET_AFTER``, so that the
crash can be seen, and is removed when a process starts after that.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete
from sqlalchemy.dialects import postgresql, sqlite

from services.db.models import Worker

log = logging.getLogger(__name__)
workers = Worker.__table__

FORGET_AFTER = timedelta(days=7)


class Heartbeat:
    def __init__(
        self,
        engine: Engine,
        kind: str,
        worker_id: str,
        info: Callable[[], dict[str, Any]] = dict,
        every_s: float = 10.0,
    ) -> None:
        self.engine = engine
        self.kind = kind
        self.worker_id = worker_id
        self.info = info
        self.every_s = every_s
        self.started_at = datetime.now(UTC)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{kind}", daemon=True)
        self.failing = False  # the last beat failed: the database may be away

    def start(self, *, first_must_succeed: bool = True) -> Heartbeat:
        """The first beat, then a beat every ``every_s`` on a thread. ``first_must_succeed=False`` (the API, which
        must come up while the database is away) logs a failed first beat and lets the thread try again, so the
        process appears on /status once the database is back instead of never."""
        try:
            self.beat()
            with self.engine.begin() as conn:  # rows of processes long dead (killed, not stopped)
                conn.execute(delete(workers).where(workers.c.seen_at < datetime.now(UTC) - FORGET_AFTER))
        except Exception as exc:
            if first_must_succeed:
                raise
            self.failing = True
            log.warning("heartbeat failed (%s); trying again every %.0f s", exc, self.every_s)
        self._thread.start()
        return self

    def stop(self, remove: bool = True) -> None:
        """End the beats and remove the row; ``remove=False`` (the database is known to be away) leaves the row to
        go stale on /status rather than wait out a connect timeout, and waits little for a beat caught in one. A
        beat still under way after the join would write the row again after its removal: it is left in place
        then too."""
        self._stop.set()
        self._thread.join(5 if remove else 0.5)
        if not remove or self._thread.is_alive():
            log.info("heartbeat row %s left in place (the database is away or slow): it goes stale", self.worker_id)
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(workers).where(workers.c.worker_id == self.worker_id))
        except Exception:  # the database may be the reason we stop
            log.debug("could not remove heartbeat row", exc_info=True)

    def beat(self) -> None:
        now = datetime.now(UTC)
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        values = {
            "worker_id": self.worker_id,
            "kind": self.kind,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "seen_at": now,
            "info": self.info(),
        }
        statement = dialect.insert(workers).values(**values)
        # the whole row but its id: a process restarted under the same id (a pod's hostname and pid 1, a StatefulSet's
        # client id) must show its own start on /status, not the crashed one's
        statement = statement.on_conflict_do_update(
            index_elements=["worker_id"], set_={k: v for k, v in values.items() if k != "worker_id"}
        )
        with self.engine.begin() as conn:
            conn.execute(statement)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
                self.failing = False
            except Exception as exc:  # a heartbeat must never take its process down
                self.failing = True
                log.warning("heartbeat failed: %s", exc)
