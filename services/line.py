"""A simulated galvanizing line publishing CoilMessage v1 on MQTT, as a sensor gateway would."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

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


@dataclass(frozen=True)
class LinePosition:
    """Where a simulated line stands: how many coils it has made, and its clock after the last one.

    A gateway keeps its coil counter across restarts; a simulated one that started at coil 1 again would send
    ids the plant has decided already, which AssessCoils takes for redeliveries (the same seed) or refuses
    (another seed). ``coilguard simulate --counter FILE`` keeps this position in a file instead."""

    coils: int = 0
    clock: datetime | None = None  # None: the line's configured start

    @classmethod
    def read(cls, path: Path) -> LinePosition:
        """The position kept in ``path``; the start of the line when the file does not exist yet."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        try:
            kept = json.loads(text)
            position = cls(int(kept["coils"]), datetime.fromisoformat(kept["clock"]) if kept["clock"] else None)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} does not hold a line's position ({exc!r}): fix or remove it") from exc
        if position.coils < 0 or (position.clock is not None and position.clock.tzinfo is None):
            raise ValueError(f"{path} does not hold a line's position: {text.strip()!r}")
        return position

    def write(self, path: Path) -> None:
        """Replace ``path`` whole (written beside it, then renamed): a kill mid-write leaves the last position."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = path.with_name(f".{path.name}.{os.getpid()}")
        clock = self.clock.isoformat() if self.clock is not None else None
        fresh.write_text(json.dumps({"coils": self.coils, "clock": clock}) + "\n", encoding="utf-8")
        os.replace(fresh, path)
