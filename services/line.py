"""A simulated galvanizing line publishing CoilMessage v1 on MQTT, as a sensor gateway would."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from ml.sim import SimCoil
from services.mqtt.client import MqttClient
from workflows.messages import encode_coil_message
from workflows.topics import Topics


def publish_coils(
    client: MqttClient,
    topics: Topics,
    coils: Iterable[SimCoil],
    *,
    rate: float | None = None,
    binary: bool = False,
    on_published: Callable[[SimCoil, float], None] | None = None,
) -> int:
    """Publish every coil at ``rate`` coils/s (as fast as possible when None); returns how many.

    Pacing is against a fixed schedule (start + i/rate), so a slow publish is caught up rather than
    lowering the offered rate. ``on_published`` gets each coil and its publish time (epoch seconds).
    """
    start = time.perf_counter()
    n = 0
    for n, coil in enumerate(coils, start=1):
        if rate:
            delay = start + (n - 1) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        payload = encode_coil_message(
            coil.coil_id, coil.line, coil.produced_at, coil.thickness, product=coil.product, binary=binary
        )
        client.publish(topics.sensors(coil.line), payload, qos=1)
        if on_published is not None:
            on_published(coil, time.time())
    return n
