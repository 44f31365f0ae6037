"""Simulated operators for the demo and the drift benchmark: people checking coilguard's decisions.

Like a real shift they check every coil called NOK (it is about to be downgraded or scrapped, so
somebody looks) and a random share of the coils called OK; they know the truth (here: the
simulator's true label), and write their verdict into ``feedback`` as any operator tool would.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from services.mqtt.client import Inbound
from workflows.ports import FeedbackStore

log = logging.getLogger(__name__)
_STOP = object()  # not None: a decision message may be JSON null


class SimulatedOperators:
    def __init__(
        self,
        store: FeedbackStore,
        truth: Callable[[str], int | None],
        *,
        share_ok: float = 0.2,
        seed: int = 0,
        names: tuple[str, ...] = ("anna", "ben", "chiara"),
    ) -> None:
        self.store = store
        self.truth = truth
        self.share_ok = share_ok
        self.names = names
        self.rng = np.random.default_rng(seed)
        self.given = 0
        self.disagreed = 0
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="operators", daemon=True)

    def start(self) -> SimulatedOperators:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join(30)

    def on_decision(self, message: Inbound) -> None:
        """MQTT callback for the decision topic: queue the decision (never write on paho's thread)."""
        self._inbox.put(orjson.loads(message.payload))  # any JSON: `_check` judges it on the operators' thread

    def idle(self) -> bool:
        return self._inbox.empty()

    def _work(self) -> None:
        while (decision := self._inbox.get()) is not _STOP:
            try:
                self._check(decision)
            except Exception:  # a message of another shape, a failed write: the operators go on with the next one
                log.exception("operator feedback on decision %.200r failed", decision)

    def _check(self, decision: Any) -> None:
        coil_id = decision["coil_id"]
        if decision["decision"] == "OK" and self.rng.random() >= self.share_ok:
            return
        truth = self.truth(coil_id)  # asked only for the coils they check (it may keep count)
        if truth is None:  # not a coil these operators can check
            return
        label = "NOK" if truth else "OK"
        operator = self.names[int(self.rng.integers(len(self.names)))]
        self.store.add(coil_id, label, operator)
        self.given += 1
        self.disagreed += label != decision["decision"]
