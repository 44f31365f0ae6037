"""A simulated galvanizing line publishing CoilMessage v1 on MQTT, as a sensor gateway would."""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from ml.durable import write_atomic
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
        """Replace ``path`` whole: a kill or a power cut mid-write leaves the last position."""
        clock = self.clock.isoformat() if self.clock is not None else None
        write_atomic(path, json.dumps({"coils": self.coils, "clock": clock}) + "\n")


class CounterError(Exception):
    """The line's position cannot be kept: its file unreadable or unwritable, or held by another run."""


class LineCounter:
    """A line's position in a file, held by one run at a time (a second run on the same file would send the same
    coil ids): a lock beside the file for as long as the run lasts.

    :meth:`counted` writes the position of each coil before the coil is handed over to be sent, so that a run
    killed between the two loses that coil (as a gateway loses the one in flight) rather than the next run
    sending its id again with other readings, which AssessCoils would refuse."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock: IO[bytes] | None = None
        self.start = LinePosition()  # where the line stood when this run took the file

    def __enter__(self) -> LineCounter:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_name(f".{self.path.name}.lock"), "ab")  # held until __exit__
        except OSError as exc:
            raise CounterError(f"cannot keep the line's position in {self.path}: {exc}") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise CounterError(f"another run holds {self.path}: two runs would send the same coil ids") from None
        self._lock = lock
        try:
            self.start = self._read()
            self._write(self.start)  # a place it cannot write to is said now, not after the first coil went out
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.close()  # and with it the lock
            self._lock = None

    def _read(self) -> LinePosition:
        try:
            return LinePosition.read(self.path)
        except (ValueError, OSError) as exc:
            raise CounterError(str(exc)) from exc

    def counted(self, coils: Iterable[SimCoil]) -> Iterator[SimCoil]:
        for coil in coils:
            self._write(LinePosition(coil.index + 1, coil.produced_at))
            yield coil

    def _write(self, position: LinePosition) -> None:
        try:
            position.write(self.path)
        except OSError as exc:
            raise CounterError(f"cannot keep the line's position in {self.path}: {exc}") from exc
