"""The simulated operators of the demo and the drift benchmark."""

from __future__ import annotations

import orjson

from services.mqtt.client import Inbound
from services.operators import SimulatedOperators


class _Feedback:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, coil_id: str, label: str, operator: str) -> None:
        self.rows.append((coil_id, label, operator))


def _decision(payload: dict) -> Inbound:
    return Inbound(topic="coilguard/decisions/galv-1", payload=orjson.dumps(payload), mid=1, qos=1, redelivered=False)


def test_a_decision_of_another_shape_does_not_stop_the_operators() -> None:
    """Anybody may publish on the decisions topic: one message without a `decision` ended the operators' thread,
    and no feedback was written from then on."""
    store = _Feedback()
    operators = SimulatedOperators(store, truth=lambda coil_id: 1, names=("anna",)).start()
    operators.on_decision(_decision({"coil_id": "C-1"}))
    operators.on_decision(Inbound(topic="coilguard/decisions/galv-1", payload=b"null", mid=2, qos=1))
    operators.on_decision(_decision({"coil_id": "C-2", "decision": "NOK"}))
    operators.stop()
    assert store.rows == [("C-2", "NOK", "anna")] and operators.given == 1 and operators.disagreed == 0
