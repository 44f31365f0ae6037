"""``coilguard announce``: decisions that are stored but never reached the broker, announced again.

A decision can be left unannounced for good: the broker refused it (its ACL) and the worker gave it up, or held
it in a broker session that was lost, or the coil came at QoS 0 (docs/operations.md). Nothing is redelivered
for those coils, so nothing else would announce them; this does, once the cause is mended, oldest first, and
marks each one published once the broker confirms it. The scheduler runs it every ``ANNOUNCE_EVERY``
(:func:`run_announce`), so that such decisions reach the line's consumers without an operator; the command is
for one that wants them out now, or one line at a time.

Only decisions stored more than ``ANNOUNCE_AFTER`` ago are taken: until then the worker that decided them
announces them itself. One that a worker is still offering (held after a refusal, re-sent after a broker
outage longer than that) may go out twice, from both: at least once, as QoS 1 is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from services.config import Settings
from services.db.engine import engine_for
from services.db.repositories import ANNOUNCE_LOCK_NAMESPACE, SqlCoilStore, release_lock, try_lock
from services.metrics import METRICS
from services.runtime import mqtt_client, topics
from workflows.assess import stored_announcements

log = logging.getLogger(__name__)

CONFIRM_S = 30.0
CHUNK = 500  # decisions published, confirmed and marked at a time
SCHEDULED_LIMIT = 10_000  # decisions per scheduled pass; the rest, oldest first, at the next


@dataclass
class Announced:
    announced: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # coil id → the broker's reason


class AlreadyRunning(RuntimeError):
    """Another ``coilguard announce`` holds the lock: two at once would send every decision twice."""


def announce_unannounced(
    settings: Settings, older_than: timedelta, limit: int, line: str | None = None, engine: Engine | None = None
) -> Announced:
    """Announce the decisions stored more than ``older_than`` ago (at most ``limit``, of ``line`` when given)
    that never reached the broker. ``older_than`` leaves a running worker the coils it is about to announce
    itself; each chunk is read again just before it goes out, so that one announced meanwhile is skipped."""
    with engine_for(settings.database_url, engine) as engine:
        got, lock = try_lock(engine, ANNOUNCE_LOCK_NAMESPACE, 0, "announce")
        if not got:
            raise AlreadyRunning("another `coilguard announce` is running: two at once would send each decision twice")
        try:
            return _announce(settings, SqlCoilStore(engine), older_than, limit, line)
        finally:
            release_lock(lock)


def _announce(
    settings: Settings, store: SqlCoilStore, older_than: timedelta, limit: int, line: str | None
) -> Announced:
    done = Announced()
    coil_ids = store.unannounced(datetime.now(UTC) - older_than, limit, line)
    if coil_ids:
        with mqtt_client(settings) as client:
            for start in range(0, len(coil_ids), CHUNK):  # each chunk confirmed and marked before the next
                outgoing = stored_announcements(store, topics(settings), coil_ids[start : start + CHUNK])
                client.take_refused()  # none of ours yet: ids are reused, so only this chunk's refusals count
                sent = {client.publish(out.topic, out.payload, qos=1).mid: out for out in outgoing}
                if not client.flush(CONFIRM_S):
                    raise ConnectionError(
                        f"the broker did not confirm the decisions within {CONFIRM_S:.0f} s; "
                        f"{len(done.announced)} were announced and marked before"
                    )
                refused = {mid: reason for mid, reason in client.take_refused() if mid in sent}
                taken = [str(out.coil_id) for mid, out in sent.items() if mid not in refused]
                done.refused.update({str(sent[mid].coil_id): reason for mid, reason in refused.items()})
                store.mark_published(taken)
                done.announced += taken
                METRICS.announced_late.inc(len(taken))
                METRICS.publish_refused.labels("late").inc(len(refused))
        log.info("announced %d stored decisions, %d refused by the broker", len(done.announced), len(done.refused))
    return done


def run_announce(settings: Settings, engine: Engine | None = None) -> Announced | None:
    """The scheduler's pass: announce what is older than ``ANNOUNCE_AFTER``; None when it did not run (another
    pass or the command holds the lock, or the broker is away: the next pass tries again)."""
    try:
        done = announce_unannounced(settings, settings.announce_after, SCHEDULED_LIMIT, engine=engine)
    except AlreadyRunning:
        log.info("announce skipped: another one is running (`coilguard announce`, or a second scheduler)")
        return None
    except ConnectionError as exc:  # what the broker confirmed before is marked; the rest waits for the next pass
        log.warning("announce stopped: %s; the next pass tries again", exc)
        return None
    METRICS.unannounced.set(len(done.refused))
    if done.refused:
        log.warning(
            "the broker still refuses %d stored decisions (%s), e.g. coil %s: does its ACL let this account publish "
            "on their lines' decision topics? Offered again every %s", len(done.refused),
            ", ".join(sorted(set(done.refused.values()))), next(iter(done.refused)), settings.announce_every,
        )  # fmt: skip
    return done
