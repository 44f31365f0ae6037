"""``coilguard announce``: decisions that are stored but never reached the broker, announced again.

A decision can be left unannounced for good: the broker refused it (its ACL) and the worker gave it up, or held
it in a broker session that was lost, or the coil came at QoS 0 (docs/operations.md). Nothing is redelivered
for those coils, so nothing else would announce them; this does, once the cause is mended, oldest first, and
marks each one published once the broker confirms it. The scheduler runs it every ``ANNOUNCE_EVERY``
(:func:`run_announce`), so that such decisions reach the line's consumers without an operator, up to
``ANNOUNCE_MAX_AGE`` old; the command is for older ones, for one that wants them out now, or one line at a time.

Only decisions stored more than ``ANNOUNCE_AFTER`` ago are taken: until then the worker that decided them
announces them itself. One that a worker is still offering (held after a refusal, re-sent after a broker
outage longer than that) may go out twice, from both: at least once, as QoS 1 is.

A line whose decision the broker refuses is not offered again in the same pass: its ACL would refuse the rest
too, and a line with thousands of given-up decisions must not keep the other lines' from going out.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from services.config import Settings, format_duration
from services.db.engine import engine_for
from services.db.repositories import (
    ANNOUNCE_LOCK_NAMESPACE,
    SqlCoilStore,
    UnannouncedWindow,
    release_lock,
    try_lock,
)
from services.metrics import METRICS
from services.mqtt.client import ConnectCancelled, MqttClient
from services.runtime import mqtt_client, topics
from workflows.assess import stored_announcements
from workflows.topics import Topics

log = logging.getLogger(__name__)

CONFIRM_S = 30.0
CHUNK = 500  # decisions published, confirmed and marked at a time
SCHEDULED_LIMIT = 10_000  # decisions offered per scheduled pass; the rest, oldest first, at the next


@dataclass
class Announced:
    announced: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # coil id → the broker's reason
    refused_lines: set[str] = field(default_factory=set)  # the rest of their decisions was not offered

    @property
    def offered(self) -> int:
        return len(self.announced) + len(self.refused)


class AlreadyRunning(RuntimeError):
    """Another announce (the scheduler's pass, or ``coilguard announce``) holds the lock: two at once would send
    every decision twice."""


class Interrupted(ConnectionError):
    """Stopped before the broker confirmed a chunk: it stays unmarked, and goes out again at the next pass."""


def announce_unannounced(
    settings: Settings,
    older_than: timedelta,
    limit: int,
    line: str | None = None,
    engine: Engine | None = None,
    *,
    max_age: timedelta | None = None,
    stop: threading.Event | None = None,
) -> Announced:
    """Announce the decisions stored more than ``older_than`` ago (and at most ``max_age`` ago, when given; at
    most ``limit`` offered, of ``line`` when given) that never reached the broker. ``older_than`` leaves a running
    worker the coils it is about to announce itself; each chunk is read again just before it goes out, so that
    one announced meanwhile is skipped. ``stop`` ends it between chunks, or while the broker's word is awaited
    (:class:`Interrupted`)."""
    with engine_for(settings.database_url, engine) as engine:
        got, lock = try_lock(engine, ANNOUNCE_LOCK_NAMESPACE, 0, "announce")
        if not got:
            raise AlreadyRunning(
                "another announce is running (the scheduler's pass, or `coilguard announce`): two at once would send "
                "each decision twice; try again in a minute"
            )
        try:
            now = datetime.now(UTC)
            since = now - max_age if max_age is not None else None
            window = UnannouncedWindow(now - older_than, CHUNK, line, since=since)  # each page sized as it is read
            pages = _Pages(SqlCoilStore(engine), window)
            return _announce(settings, pages, limit, stop or threading.Event())
        finally:
            release_lock(lock)


@dataclass
class _Pages:
    """The unannounced decisions in the window, a page at a time by their key, so that refused ones (which stay
    unannounced) do not come back within one pass."""

    store: SqlCoilStore
    window: UnannouncedWindow

    def next(self, size: int, skip_lines: set[str]) -> list[str]:
        page = self.store.unannounced(replace(self.window, limit=size, skip_lines=frozenset(skip_lines)))
        if page:
            coil_id, decided_at = page[-1]
            self.window = replace(self.window, after=(decided_at, coil_id))
        return [coil_id for coil_id, _ in page]


def _announce(settings: Settings, pages: _Pages, limit: int, stop: threading.Event) -> Announced:
    done = Announced()
    client: MqttClient | None = None
    try:
        while done.offered < limit and not stop.is_set():
            coil_ids = pages.next(min(CHUNK, limit - done.offered), done.refused_lines)
            if not coil_ids:
                break
            client = client or mqtt_client(settings).connect(stop=stop)
            _announce_chunk(client, pages.store, topics(settings), coil_ids, done, stop)
    finally:
        if client is not None:
            client.close()
    if done.offered:
        log.info("announced %d stored decisions, %d refused by the broker", len(done.announced), len(done.refused))
    return done


def _announce_chunk(
    client: MqttClient, store: SqlCoilStore, tps: Topics, coil_ids: list[str], done: Announced, stop: threading.Event
) -> None:
    """Publish, await the broker's word, and mark what it took; each chunk so before the next."""
    outgoing = stored_announcements(store, tps, coil_ids)
    client.take_refused()  # none of ours yet: ids are reused, so only this chunk's refusals count
    sent = {client.publish(out.topic, out.payload, qos=1).mid: out for out in outgoing}
    if not client.flush(CONFIRM_S, stop=stop):
        before = f"{len(done.announced)} were announced and marked before"
        if stop.is_set():
            raise Interrupted(f"stopped before the broker confirmed {len(sent)} decisions; {before}")
        raise ConnectionError(f"the broker did not confirm the decisions within {CONFIRM_S:.0f} s; {before}")
    refused = {mid: reason for mid, reason in client.take_refused() if mid in sent}
    taken = [str(out.coil_id) for mid, out in sent.items() if mid not in refused]
    for mid, reason in refused.items():
        done.refused[str(sent[mid].coil_id)] = reason
        done.refused_lines.add(str(sent[mid].line))
    store.mark_published(taken)
    done.announced += taken
    METRICS.announced_late.inc(len(taken))


def run_announce(
    settings: Settings, engine: Engine | None = None, *, stop: threading.Event | None = None
) -> Announced | None:
    """The scheduler's pass: announce what is older than ``ANNOUNCE_AFTER`` and younger than ``ANNOUNCE_MAX_AGE``;
    None when it was cut short (another pass or the command holds the lock, the broker away or silent, a stop
    while its word was awaited: the next pass tries again). ``coilguard_decisions_unannounced`` is set to what
    is left either way."""
    done = None
    with engine_for(settings.database_url, engine) as engine:
        try:
            done = announce_unannounced(
                settings, settings.announce_after, SCHEDULED_LIMIT, engine=engine,
                max_age=settings.announce_max_age, stop=stop,
            )  # fmt: skip
        except AlreadyRunning:
            log.info("announce skipped: another one is running (`coilguard announce`, or a second scheduler)")
        except (Interrupted, ConnectCancelled) as exc:  # the scheduler stopping
            log.info("announce: %s; the next pass offers them again", exc)
        except ConnectionError as exc:  # what the broker confirmed before is marked; the rest waits for the next pass
            log.warning("announce stopped: %s; the next pass tries again", exc)
        if done is not None and done.refused:
            log.warning(
                "the broker refused %d stored decisions (%s) on lines %s, e.g. coil %s: does its ACL let this account "
                "publish on their decision topics? Those lines' decisions are offered again every %s",
                len(done.refused), ", ".join(sorted(set(done.refused.values()))), ", ".join(sorted(done.refused_lines)),
                next(iter(done.refused)), format_duration(settings.announce_every or timedelta(0)),
            )  # fmt: skip
        _count_left(settings, SqlCoilStore(engine))
    return done


_said_too_old = 0  # the count of decisions past ANNOUNCE_MAX_AGE last logged: said again only when it changes


def _count_left(settings: Settings, store: SqlCoilStore) -> None:
    global _said_too_old
    now = datetime.now(UTC)
    max_age = settings.announce_max_age
    left, too_old = store.count_unannounced(
        now - settings.announce_after, now - max_age if max_age is not None else None
    )
    METRICS.unannounced.set(left)
    if too_old and too_old != _said_too_old and max_age is not None:
        log.warning(
            "%d stored decisions older than ANNOUNCE_MAX_AGE (%s) never reached the broker; the scheduler no longer "
            "offers them: `coilguard announce --older-than %s` sends them", too_old, format_duration(max_age),
            format_duration(max_age),
        )  # fmt: skip
    _said_too_old = too_old
