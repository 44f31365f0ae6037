"""The AssessCoils worker (``coilguard assess``): MQTT in, ensemble, Postgres, MQTT out.

Threads: paho's network thread only enqueues; the worker thread takes micro-batches (up to
``BATCH_SIZE`` messages, waiting at most ``BATCH_WAIT`` after the first), parses them and lets the
ensemble vote; a committer thread writes each batch in one transaction, publishes, and only then
acknowledges. The two halves overlap, so database and broker round trips hide behind inference.

The broker never has more than its receive maximum of unacknowledged messages in flight to us, which
is the back-pressure: while the database is down the worker keeps its batch, retries, and the broker
stops sending rather than anything being dropped.
"""

from __future__ import annotations

import logging
import math
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import get_args

import orjson
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ml.ensemble import share_threads
from services.config import Settings
from services.db.engine import make_engine
from services.db.repositories import SqlCoilStore, SqlModelRegistry
from services.heartbeat import Heartbeat
from services.metrics import METRICS, serve_metrics, set_probes
from services.mqtt.client import ConnectCancelled, Inbound, MqttClient, forget_session
from services.runtime import mqtt_client, topics
from services.signals import SIGNAL_POLL_S, StopSignals
from workflows.assess import (
    AssessCoils,
    BatchResult,
    EnsembleLoader,
    NoActiveModel,
    Outgoing,
    Prepared,
    RawMessage,
    ServingEnsemble,
)
from workflows.messages import ModelEventKind, RejectedMessage, Rejection, coil_id_of, dumps

log = logging.getLogger(__name__)

RELOAD_POLL_S = 30.0  # also look at the registry this often, in case a `promoted` event was missed
MARK_IDLE_S = 0.2  # with no next batch this soon, mark the last batch's decisions published on their own
CONFIRM_WAIT_S = 30.0  # how long to wait for the broker to confirm a batch's decisions before saying so
HELD_RETRY_S = 10.0  # how often decisions the broker refused are offered again
ANNOUNCED_MEMORY = 4096  # coils whose decision was published, remembered until long after their mark
JOIN_ON_ERROR_S = 30.0  # run() interrupted on the main thread: how long it waits for the worker to stop
MODEL_WAIT_S = 5.0  # with no active model yet, look at the registry again this often
RETIRE_IDLE_S = 3.0  # a retiring worker is done when its session has delivered nothing for this long
# A loop of the worker (its thread, the committer) that has not come round for this long is hung: /health/live says
# so and Kubernetes restarts the pod. Every wait in them is in slices of at most BEAT_S, a database outage's
# retries included, so only a hang (a deadlock, a call that never returns) goes this long; loading the ensemble
# takes seconds to a minute.
LIVE_S = 300.0
BEAT_S = 5.0
# What one coil's own values can make the database refuse. Every other database error is the database's state
# (unreachable, read-only after a failover, a permission revoked, the schema behind), which no coil caused: the
# worker waits it out with the batch in hand instead of rejecting every coil as "could not be stored".
ROW_ERRORS = (IntegrityError, DataError)
# The database is away, not the coil at fault: a driver error, no pooled connection free in time (the API sharing
# the engine in `coilguard up` holding them all), or a connection the pool found dead. Waited out, never rejected.
DATABASE_AWAY = (DBAPIError, PoolTimeout, DisconnectionError)


def worker_client_id(settings: Settings, given: str | None = None) -> str:
    """``--client-id``, ``MQTT_CLIENT_ID``, the ``MQTT_URL``'s ``client_id``, or one derived from the host.

    The broker keeps a persistent session per id and queues that worker's share of the stream while it is
    away, so the id must come back after a restart (a random one would strand the share) and differ between
    workers (two with one id knock each other off). The host name does both for one worker per host and
    for the pods of a StatefulSet; more workers on one host each need their own ``--client-id``."""
    return given or settings.mqtt_client_id or settings.mqtt.client_id or f"coilguard-assess-{socket.gethostname()}"


class RecentCoils:
    """The last ``size`` coil ids added, with a lock: the committer adds, the worker thread asks about the rare
    coil found decided but not yet marked published (no copy per batch on the hot path)."""

    def __init__(self, size: int) -> None:
        self._ids: dict[str, None] = {}  # insertion-ordered: the oldest goes first
        self._size = size
        self._lock = threading.Lock()

    def add_all(self, coil_ids: list[str]) -> set[str]:
        """Add (or refresh) these ids; returns those that were not there before."""
        new = set()
        with self._lock:
            for coil_id in coil_ids:
                if coil_id in self._ids:
                    del self._ids[coil_id]  # moved to the newest end
                else:
                    new.add(coil_id)
                self._ids[coil_id] = None
            while len(self._ids) > self._size:
                del self._ids[next(iter(self._ids))]
        return new

    def discard_all(self, coil_ids: set[str]) -> None:
        with self._lock:
            for coil_id in coil_ids:
                self._ids.pop(coil_id, None)

    def __contains__(self, coil_id: object) -> bool:
        with self._lock:
            return coil_id in self._ids


@dataclass
class WorkerStats:
    batches: int = 0
    decided: int = 0
    rejected: int = 0
    duplicates: int = 0
    republished: int = 0
    reloads: int = 0
    refused_reloads: int = 0  # registry changes that did not load: the previous ensemble went on serving
    session_removed: bool = False  # retiring: the session was assessed to the end and removed


class AssessWorker:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        client_id: str | None = None,
        on_batch: Callable[[BatchResult], None] | None = None,
        retire: bool = False,
    ) -> None:
        """``retire``: assess what the broker kept for this client id's session, then end the session (the
        way to remove a worker for good: its session would otherwise go on queuing its share of the stream)."""
        self.settings = settings
        self.retire = retire
        self.topics = topics(settings)
        self.engine = engine or make_engine(settings.database_url)
        self.store = SqlCoilStore(self.engine)
        self.loader = EnsembleLoader(SqlModelRegistry(self.engine), settings.model_dir, settings.decision_threshold)
        self.workflow = AssessCoils(self.store, self.topics, max_payload_bytes=settings.max_payload_bytes)
        self.on_batch = on_batch
        self.stats = WorkerStats()
        self.stopping = threading.Event()
        self.subscribed = threading.Event()  # the broker keeps coils for this worker from now on
        self.ready = threading.Event()  # … and it assesses them
        self._inbox: queue.Queue[Inbound] = queue.Queue()
        self._qos0_warned = -math.inf
        self._held: dict[str, _Held] = {}  # decisions the broker refused, by coil id (oldest first)
        self._held_tried = -math.inf
        # at most two voted batches wait for the committer: enough to overlap, little to redo after a crash
        self._pending: queue.Queue[tuple[list[Inbound], Prepared, float] | None] = queue.Queue(maxsize=2)
        self._beats: dict[str, float] = {}  # thread name → when its loop last came round (time.monotonic())
        self._reload = threading.Event()
        # coils the committer has announced, for the worker thread to tell a re-sent coil from one to announce
        self._announced = RecentCoils(ANNOUNCED_MEMORY)
        self._failure: BaseException | None = None  # what stopped the committer, should anything have
        self._gave_up = False  # stopping, and the database was found away: nothing more is tried on it
        self._ended = False  # the committer has taken the end marker: nothing more will be handed over
        self._serving: ServingEnsemble | None = None
        self._last_poll = 0.0
        self._last_inbound = self._last_acked = time.monotonic()
        self.last_decision_at: str | None = None
        receive_maximum = max(4 * settings.batch_size, 256)  # QoS 1 coils the broker lets wait here, at most
        # a coil sent at QoS 0 is dropped while this many wait: the two kinds together stay within twice that
        self.qos0_high_water = receive_maximum
        # refused decisions held at most: below the receive maximum by two batches, so that the other lines go on
        self.held_limit = max(receive_maximum - 2 * settings.batch_size, 1)
        self.client: MqttClient = mqtt_client(
            settings,
            client_id=worker_client_id(settings, client_id),
            persistent=True,
            manual_ack=True,
            receive_maximum=receive_maximum,
            on_message=self._on_message,
        )

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> WorkerStats:
        """Block until :meth:`stop` (or SIGTERM/SIGINT when run from the main thread).

        From the main thread the worker runs on a thread of its own while the main thread watches for the
        signals: a handler that called :meth:`stop` would set an event whose lock the interrupted worker may
        be holding (``services.signals``)."""
        if threading.current_thread() is not threading.main_thread():
            return self._run()
        ended: list[WorkerStats] = []
        failed: list[BaseException] = []

        def serve() -> None:
            try:
                ended.append(self._run())
            except BaseException as exc:  # raised again on the main thread: the exit status says it
                failed.append(exc)

        thread = threading.Thread(target=serve, name="assess-worker")
        with StopSignals().installed() as signals:
            thread.start()
            try:
                while thread.is_alive():
                    if signals.requested and not self.stopping.is_set():
                        self.stop()
                    thread.join(SIGNAL_POLL_S)
            except BaseException:  # another handler raised here (a test's timeout): the worker must not go on
                self.stop()
                thread.join(JOIN_ON_ERROR_S)
                if thread.is_alive():
                    log.error("the worker thread did not stop within %.0f s", JOIN_ON_ERROR_S)
                raise
        if failed:
            raise failed[0]
        return ended[0]

    def _run(self) -> WorkerStats:
        # 2 cores, full ensemble, share of the compute limit: 67 / 71 % at 5 ms, 76 / 76 / 71 % at 0.5 ms
        sys.setswitchinterval(self.settings.gil_switch_ms / 1000)
        self.loader.shards = share_threads(self.settings.inference_shards, self.settings.torch_threads)
        if not self.retire:  # a retiring worker is run by hand, often inside a pod whose own worker has the port
            set_probes(live=self._liveness, ready=self._readiness)
            serve_metrics(self.settings.metrics_port)
        # subscribed before any model is there: the broker keeps the coils of a fresh install for the session
        try:
            try:
                self.client.connect(timeout=60, stop=self.stopping)
            except ConnectCancelled:  # stopped before the broker answered: nothing was taken
                log.info("assess worker stopped before the broker accepted its connection")
                return self.stats
            if self.retire:  # what the session kept still arrives; nothing new is routed to it
                self.client.unsubscribe(self.topics.shared_sensors())
            else:
                self.client.subscribe(self.topics.model_events, qos=1)
                self.client.subscribe(self.topics.shared_sensors(), qos=1)
            self.subscribed.set()
            self._serving = self._wait_for_models()
        except BaseException:  # e.g. the broker unreachable: let go of everything for a caller that retries
            self._disconnect()  # a subscribe that failed after connecting must not leave this client id online
            raise
        if self._serving is None:
            self._disconnect()
            return self.stats
        log.info("serving ensemble: %s", self._serving.describe())
        self._last_inbound = time.monotonic()
        self.ready.set()
        log.info("assess worker %s %s", "retiring:" if self.retire else "ready:", self.topics.shared_sensors())
        heartbeat = Heartbeat(
            self.engine, "assess", self.client.client_id, self._status, self.settings.heartbeat_every.total_seconds()
        )
        try:
            self._retry("start the heartbeat", heartbeat.start)
        except _Stopped:  # stopped while the database is away, before any coil was taken
            self._serving.ensemble.close()
            self._disconnect()
            return self.stats
        committer = threading.Thread(target=self._commit_loop, name="assess-commit", daemon=True)
        committer.start()
        drained = False
        try:
            while not self.stopping.is_set():
                self._beat()
                self._maybe_reload()
                batch = self._collect()
                if batch:
                    self._hand_over(self._prepare(batch))
                elif self.retire and self._drained():
                    drained = True
                    break
            # assess what had arrived when the stop came, so that a rolling restart hands back little; not what
            # arrives after it: a worker catching up on a backlog would drain until the grace period ran out
            left = self._inbox.qsize() if self._failure is None else 0
            while left > 0 and (batch := self._collect(wait=False, limit=left)):
                left -= len(batch)
                self._hand_over(self._prepare(batch))
        except _Stopped:
            log.warning("stopped while the database was unreachable; unacknowledged coils will be redelivered")
        finally:
            self._pending.put(None)
            committer.join()
            heartbeat.stop(remove=not (self._gave_up or heartbeat.failing))
            if self._serving is not None:
                self._serving.ensemble.close()
            self._disconnect()
            if drained:
                forget_session(self.client.url, self.client.client_id)
                self.stats.session_removed = True
                log.info("session %s assessed to the end and removed", self.client.client_id)
            log.info("assess worker stopped: %s", self.stats)
        if self._failure is not None:  # exit non-zero, so that the pod (or `coilguard up`) starts a fresh worker
            raise WorkerFailed(f"the committer failed: {type(self._failure).__name__}: {self._failure}") from (
                self._failure
            )
        return self.stats

    def _drained(self) -> bool:
        """Retiring: has the session handed over all it kept? Only once every batch taken is settled and nothing
        has arrived for RETIRE_IDLE_S since the last acknowledgement: until then the broker holds back whatever
        its receive maximum does not let through, however long a commit takes, and removing the session would
        throw that away."""
        quiet = time.monotonic() - max(self._last_inbound, self._last_acked)
        return self._pending.unfinished_tasks == 0 and quiet > RETIRE_IDLE_S and not self._held

    def _disconnect(self) -> None:
        """Close the broker connection; from here on the worker is not subscribed, and its network thread ended on
        purpose: `coilguard up` keeps the probes of a worker that failed while it waits to start the next one."""
        self.subscribed.clear()
        self.client.close()

    def _beat(self) -> None:
        self._beats[threading.current_thread().name] = time.monotonic()

    def _hand_over(self, item: tuple[list[Inbound], Prepared, float]) -> None:
        """To the committer; waiting for room in slices, each a beat: a committer riding out a database outage
        holds the worker thread here, and that is a wait, not a hang."""
        while True:
            self._beat()
            try:
                return self._pending.put(item, timeout=BEAT_S)
            except queue.Full:
                continue

    def _liveness(self) -> str | None:
        """/health/live: None while every loop comes round; otherwise which has not, for how long."""
        if self.stopping.is_set():  # a stopping worker's loops end on purpose
            return None
        if self.subscribed.is_set() and not self.client.network_alive():  # a broker outage leaves it running
            return "the MQTT network thread has ended: no coil arrives and no reconnect is tried"
        now = time.monotonic()
        hung = {name: now - at for name, at in list(self._beats.items()) if now - at > LIVE_S}
        if not hung:
            return None
        return "no progress for " + ", ".join(f"{s:.0f} s in thread {name}" for name, s in sorted(hung.items()))

    def _readiness(self) -> str | None:
        """/health/ready: subscribed with an ensemble that loaded. A StatefulSet's rollout waits for it pod by pod,
        so a release whose models do not load stops at its first pod while the others keep assessing."""
        if self.stopping.is_set():
            return "stopping"
        if not self.subscribed.is_set():
            return "connecting to the broker"
        if self.client.refused_subscription is not None:  # connected, and no coil arrives: its ACL changed
            return self.client.refused_subscription
        if not self.ready.is_set():
            return "waiting for the registry's active models to load (`coilguard models`; the log says why)"
        return None

    def stop(self) -> None:
        self.stopping.set()
        self._reload.set()  # wakes a worker waiting for its first model

    def _wait_for_models(self) -> ServingEnsemble | None:
        """The ensemble, once the registry has one that loads (None if stopped first): a fresh install's worker,
        or one whose models do not load (a tampered or missing file), waits subscribed instead of exiting and
        restarting in a loop; the coils wait for it in the broker."""
        told = ""
        while not self.stopping.is_set():
            try:
                return self._retry("look for a model", self.loader.load)
            except _Stopped:
                return None
            except DATABASE_AWAY:
                raise
            except Exception as exc:  # NoActiveModel, or an artifact the manifest check refuses
                if str(exc) != told:
                    if isinstance(exc, NoActiveModel):
                        log.warning("%s; waiting for one (coils wait for this worker in the broker)", exc)
                    else:
                        log.error(
                            "cannot serve the registry's active models (%s); waiting for a version that loads", exc
                        )
                    told = str(exc)
                self._reload.wait(MODEL_WAIT_S)  # a `promoted` event, or the next look
                self._reload.clear()
        return None

    def _status(self) -> dict:
        """What the heartbeat reports: counters, backlog, the versions voting, the last decision."""
        serving = self._serving
        return {
            **self.stats.__dict__,
            "backlog": self._inbox.qsize(),
            "models": {name: version for name, version in serving.records} if serving else {},
            "last_decision_at": self.last_decision_at,
        }

    # ------------------------------------------------------------------ messages in

    def _on_message(self, message: Inbound) -> None:
        self._last_inbound = time.monotonic()
        if message.topic == self.topics.model_events:
            self._on_model_event(message)
        elif message.qos == 0:
            self._take_qos0(message)
        else:
            self._inbox.put(message)

    def _take_qos0(self, message: Inbound) -> None:
        """A coil at QoS 0, against the contract. The broker's receive maximum holds back only QoS 1 and 2, so
        nothing bounds these while the worker is behind (a database outage): past a backlog of ``qos0_high_water``
        (the receive maximum) they are dropped, as the sender's QoS allows, rather than grow until the pod is
        killed and every queued coil is lost with it. Counted either way, so that the gateway's setting shows."""
        if self._inbox.qsize() < self.qos0_high_water:
            METRICS.coils_qos0.labels("taken").inc()
            self._inbox.put(message)
            return
        METRICS.coils_qos0.labels("dropped").inc()
        now = time.monotonic()
        if now - self._qos0_warned >= 60.0:
            self._qos0_warned = now
            log.warning(
                "dropping coils sent at QoS 0 on %s while %d coils wait: the contract is QoS 1, which the broker "
                "would hold for this worker", message.topic, self._inbox.qsize(),
            )  # fmt: skip

    def _on_model_event(self, message: Inbound) -> None:
        try:
            event = orjson.loads(message.payload)
            if isinstance(event, dict) and event.get("event") in get_args(ModelEventKind):
                log.info(
                    "model event %s %s v%s: reloading", event.get("event"), event.get("model"), event.get("version")
                )
                self._reload.set()
        except orjson.JSONDecodeError:
            log.warning("ignored a malformed model event: %r", message.payload[:200])
        finally:
            self.client.ack(message)

    def _collect(self, wait: bool = True, limit: int | None = None) -> list[Inbound]:
        """Up to ``batch_size`` (and ``limit``) messages: block briefly for the first, then at most ``batch_wait``
        more."""
        batch: list[Inbound] = []
        try:
            batch.append(self._inbox.get(timeout=0.1) if wait else self._inbox.get_nowait())
        except queue.Empty:
            return batch
        deadline = time.monotonic() + self.settings.batch_wait.total_seconds()
        size = min(self.settings.batch_size, limit or self.settings.batch_size)
        while len(batch) < size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    # ------------------------------------------------------------------ one batch

    def _prepare(self, batch: list[Inbound]) -> tuple[list[Inbound], Prepared, float]:
        """First half, on the worker thread: parse and vote (a message that breaks the ensemble is rejected)."""
        started = time.perf_counter()
        raws = [RawMessage(m.topic, m.payload, m.received_at) for m in batch]
        serving = self._serving
        assert serving is not None
        announced = self._announced
        try:
            prepared = self._retry("look up decided coils", partial(self.workflow.prepare, raws, serving, announced))
            return batch, prepared, started
        except _Stopped:
            raise
        except Exception:
            log.exception("batch of %d failed outside the database; isolating the message at fault", len(raws))
        parts = []
        for raw in raws:
            try:
                parts.append(
                    self._retry("look up decided coils", partial(self.workflow.prepare, [raw], serving, announced))
                )
            except _Stopped:
                raise
            except Exception as exc:  # this message breaks the ensemble: reject it, keep the stream going
                log.exception("message on %s could not be assessed", raw.topic)
                parts.append(self._unassessable(raw, exc, serving.model_ids))
        return batch, self.workflow.merge(parts), started

    def _commit_loop(self) -> None:
        """The committer thread. Should it fail, the worker stops and its run raises: a committer that died on
        its own would leave the worker thread blocked on the full queue, its share of the stream stuck while
        the process still answered its probes."""
        try:
            self._commit_batches()
        except BaseException as exc:
            self._failure = exc
            log.critical("the committer failed; stopping (unacknowledged coils will be redelivered)", exc_info=True)
            self.stop()
            while not self._ended and self._pending.get() is not None:  # frees the worker thread; none acknowledged
                pass

    def _commit_batches(self) -> None:
        """Second half: write, announce, and only then acknowledge.

        That a batch's decisions reached the broker is written with the next batch's transaction (or
        on its own once the stream pauses): one database round trip per batch instead of two. Until
        then the worker remembers what it has announced, so a coil sent again is not announced again;
        only after a crash in that window is a decision announced twice (at-least-once, as QoS 1 is).
        """
        unmarked: list[str] = []
        unconfirmed = False  # stopping, and the broker never confirmed: later batches are not waited for either
        while True:
            try:
                self._beat()
                idle = unmarked or self._held
                item = self._pending.get(timeout=MARK_IDLE_S if idle else BEAT_S)
            except queue.Empty:
                if idle:
                    unmarked = self._mark_published(unmarked + self._retry_held())
                continue
            if item is None:
                self._ended = True
                break
            batch, prepared, started = item
            try:
                # Before the write: from the moment it commits, the worker thread may meet a copy of one of these
                # coils, stored and not yet marked; it is a duplicate, as the decision is on its way (should the
                # broker never confirm it, the worker stops without acknowledging this batch or any later one). A
                # coil the write then refuses is not stored, and a copy of it is assessed as new.
                fresh = self._announced.add_all(  # those not claimed by an earlier batch already
                    [coil.coil_id for coil in prepared.assessed] + prepared.result.republished
                )
                try:
                    result = self._commit(prepared, unmarked)
                except _Stopped:  # shutting down with the database away: these stay unacknowledged
                    continue
                # Not this batch's to announce after all (another worker stored the coil first): a copy that comes
                # here later announces the stored decision should that worker never have.
                self._announced.discard_all(fresh - set(result.to_mark_published))
                unmarked = []
                if unconfirmed:
                    continue
                self.client.take_refused()  # stale: of publishes settled before (a retry cut short by a stop)
                sent = {self.client.publish(out.topic, out.payload, qos=1).mid: out for out in result.publish}
                if not self._confirmed():
                    unconfirmed = True  # neither acknowledged nor marked: the coils come back and are announced
                    continue
                held, kept = self._hold_refused(sent, batch)
                unmarked = [coil_id for coil_id in result.to_mark_published if coil_id not in held]
                for message in batch:  # only now: every result is committed and announced
                    if id(message) not in kept:
                        self.client.ack(message)
                self._last_acked = time.monotonic()
                self._account(result, len(batch), time.perf_counter() - started)
            finally:
                self._pending.task_done()  # settled, one way or the other: what a retiring worker waits for
            unmarked += self._retry_held()
        self._mark_published(unmarked)
        if self._held:
            log.warning(
                "stopping with %d decisions the broker refused, stored but not announced (coils %s); the messages "
                "of the current broker session stay unacknowledged and come back to its next worker; for the others "
                "(sent at QoS 0, or of a session the broker lost) the scheduler's announce pass (unless "
                "ANNOUNCE_EVERY is off) or `coilguard announce` sends them once the broker takes them",
                len(self._held), _named(list(self._held)),
            )  # fmt: skip

    def _hold_refused(self, sent: dict[int, Outgoing], batch: list[Inbound]) -> tuple[set[str], set[int]]:
        """The coils of this batch to leave unmarked, and (by ``id``) the messages to leave unacknowledged: those
        whose decision the broker refused (its ACL does not cover a new line's topic), and copies of coils already
        held. paho counts a refused message as published; acknowledged and marked, such a coil's decision would be
        gone without a word, and a redelivered copy a duplicate.

        Held, the messages stay unacknowledged and the decision is offered again every ``HELD_RETRY_S``: once the
        ACL lets it through it is announced, acknowledged and marked, with no restart. The other lines go on, up to
        ``held_limit`` held messages (:meth:`_forget_held_beyond`). A refused rejection is logged and counted, never
        held: a bad message must not stop the stream."""
        refused = [(sent[mid], reason) for mid, reason in self.client.take_refused() if mid in sent]
        refused_coils = {out.coil_id: out for out, _ in refused if out.coil_id is not None}
        announced = {out.coil_id for out in sent.values()} - refused_coils.keys()
        for coil_id in [c for c in self._held if c in announced]:
            self._release(coil_id)  # announced again by this batch (a redelivered copy), and taken this time
        held: set[str] = set()
        kept: set[int] = set()
        if self._held or refused_coils:
            for message in batch:  # the message(s) of each such coil: a copy of a held coil joins its entry
                coil_id = coil_id_of(message.payload)
                if coil_id in refused_coils and coil_id not in self._held:
                    self._held[coil_id] = _Held(refused_coils[coil_id], [])
                if coil_id in self._held:
                    self._held[coil_id].hold(message)
                    held.add(coil_id)
                    kept.add(id(message))
        if refused:
            for out, _ in refused:
                METRICS.publish_refused.labels("decision" if out.coil_id else "rejection").inc()
            log.error(
                "the broker refused %d messages on %s (%s): does its ACL let coilguard's account publish there? %d "
                "decisions are held back unacknowledged and offered again every %.0f s",
                len(refused), ", ".join(sorted({out.topic for out, _ in refused})),
                ", ".join(sorted({reason for _, reason in refused})), len(self._held), HELD_RETRY_S,
            )  # fmt: skip
        self._forget_held_beyond(self.held_limit)  # acknowledges what it gives up, this batch's copies included
        return held, kept

    def _retry_held(self) -> list[str]:
        """Offer the held decisions again (at most every ``HELD_RETRY_S``); acknowledge those the broker takes now
        and return their coil ids, to be marked published."""
        if not self._held or time.monotonic() - self._held_tried < HELD_RETRY_S:
            return []
        self._held_tried = time.monotonic()
        try:  # announced meanwhile by `coilguard announce` (or a copy another worker decided): release, not resend
            done = [c for c, d in self.store.decided(list(self._held)).items() if d.published]
        except DATABASE_AWAY:
            done = []  # the database away: offer them again; the mark comes later
        for coil_id in done:
            self._release(coil_id)
        self.client.take_refused()  # stale, as in the batch: ids are reused, so only this round's refusals count
        sent = {}
        for coil_id, held in self._held.items():
            topic = self.topics.decisions(held.out.line) if held.out.line else held.out.topic
            sent[self.client.publish(topic, held.out.payload, qos=1).mid] = coil_id
        if not self._confirmed():
            return []
        still = {sent[mid] for mid, _ in self.client.take_refused() if mid in sent}
        released = [coil_id for coil_id in sent.values() if coil_id not in still]
        for coil_id in released:
            self._release(coil_id)
        self._announced.add_all(released)  # a copy prepared meanwhile is a duplicate, however long it was held
        if released:
            log.info("the broker took %d held decisions; %d still held", len(released), len(self._held))
        return released

    def _release(self, coil_id: str) -> None:
        for message in self._held.pop(coil_id).messages:
            self.client.ack(message)

    def _forget_held_beyond(self, limit: int) -> None:
        """Past ``limit`` held coils, or held messages, the oldest coils are given up, by name: their messages
        acknowledged, their decisions stored but never announced. Held messages count against the broker's receive
        maximum, and once it is reached the broker sends this worker nothing on any line: one line's missing ACL
        would stop them all. Messages, not coils, are what it counts: a gateway that sends a coil again while its
        decision is refused adds a message to the same held coil each time."""
        messages = sum(len(held.messages) for held in self._held.values())
        dropped: list[str] = []
        while self._held and (len(self._held) > limit or messages > limit):
            coil_id, held = next(iter(self._held.items()))
            del self._held[coil_id]
            messages -= len(held.messages)
            dropped.append(coil_id)
            for message in held.messages:
                self.client.ack(message)
        if not dropped:
            return
        METRICS.publish_refused.labels("given_up").inc(len(dropped))
        log.error(
            "more than %d messages of refused decisions held, close to the broker's receive maximum: %d coils given "
            "up, stored but not announced, so that the other lines go on (coils %s); the scheduler's announce pass "
            "(unless ANNOUNCE_EVERY is off) or `coilguard announce` sends them once the broker takes them", limit,
            len(dropped), _named(dropped),
        )  # fmt: skip

    def _confirmed(self) -> bool:
        """Has the broker acknowledged everything published? While it is away the decisions wait in the client
        (re-sent on reconnect) and so does this batch; only a worker that is stopping gives up on them. (That
        the broker *refused* some is another matter: :meth:`_hold_refused`.)"""
        while not self.client.flush(CONFIRM_WAIT_S, stop=self.stopping):  # a stop is seen within half a second
            self._beat()  # waiting out a broker outage is not a hang: /health/live stays 200
            if self.stopping.is_set():
                log.warning("stopping before the broker confirmed the last decisions: their coils stay unacknowledged")
                return False
            log.warning("the broker has not confirmed this batch's decisions in %.0f s; still waiting", CONFIRM_WAIT_S)
        return True

    def _mark_published(self, coil_ids: list[str]) -> list[str]:
        """Mark on its own; returns what is still unmarked (all of it when stopping with the database away)."""
        try:
            self._retry("mark decisions published", lambda: self.store.mark_published(coil_ids))
        except _Stopped:  # harmless: a redelivered coil is then announced once more
            return coil_ids
        return []

    def _commit(self, prepared: Prepared, published: list[str]) -> BatchResult:
        try:
            return self._retry("store the batch", lambda: self.workflow.commit(prepared, published))
        except _Stopped:
            raise
        except Exception:
            if not prepared.assessed:
                raise
            log.exception("writing a batch failed; writing its coils one by one")
        self._mark_published(published)
        merged = BatchResult()
        for part in prepared.split():
            try:
                done = self._retry("store the coil", lambda part=part: self.workflow.commit(part))
            except _Stopped:
                raise
            except Exception as exc:
                coil = part.assessed[0]
                log.exception("coil could not be stored", extra={"coil_id": coil.coil_id})
                done = part.result
                error = RejectedMessage(f"could not be stored: {type(exc).__name__}: {exc}", coil_id=coil.coil_id)
                rejection = Rejection.of(error, part.messages[coil.coil_id].payload, coil.received_at)
                done.rejected.append(rejection)
                done.publish.append(Outgoing(self.topics.rejected(coil.line), dumps(rejection)))
            merged.extend(done)
        return merged

    def _unassessable(self, raw: RawMessage, exc: Exception, model_ids: dict) -> Prepared:
        error = RejectedMessage(f"could not be assessed: {type(exc).__name__}: {exc}", coil_id=coil_id_of(raw.payload))
        rejection = Rejection.of(error, raw.payload, datetime.fromtimestamp(raw.received_at, UTC))
        result = BatchResult(rejected=[rejection])
        result.publish.append(Outgoing(self.topics.rejected(self.topics.line_of(raw.topic)), dumps(rejection)))
        return Prepared(result, model_ids)

    def _retry(self, what: str, action: Callable):
        """Run ``action``; while the database is unreachable, wait and try again (never give up a batch)."""
        delay = 0.5
        while True:
            self._beat()
            if self._gave_up:  # stopping with the database away: no more attempts, each could take a connect timeout
                raise _Stopped
            try:
                return action()
            except DATABASE_AWAY as exc:
                invalidated = getattr(exc, "connection_invalidated", False)
                if isinstance(exc, ROW_ERRORS) and not invalidated:
                    raise  # a value the database refuses: the caller finds the coil at fault
                if not self.stopping.is_set():
                    log.warning("database unavailable (%s), retrying in %.1f s: %s", what, delay, _first_line(exc))
                    if isinstance(exc, DBAPIError) and not invalidated:
                        # the sessions may be what is wrong (read-only ones stay so after the server is writable again)
                        self.engine.dispose()
                    METRICS.db_retries.inc()
                    # a stop ends the wait: SIGTERM during an outage must not sit out a backoff
                    self.stopping.wait(delay)
                    delay = min(delay * 2, 10.0)
                if self.stopping.is_set():
                    # shutting down with the database away: leave the batch unacknowledged for redelivery (a
                    # reload under way is dropped: the serving ensemble votes on nothing more). No new attempt on
                    # either thread once a failure is seen after the stop: against a host that has gone silent
                    # each one waits out the connect timeout (10 s), and the pod's grace period would end in
                    # SIGKILL. (An attempt already under way when the stop came still runs to its timeout.)
                    self._gave_up = True
                    raise _Stopped from exc

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self._reload.is_set() and now - self._last_poll < RELOAD_POLL_S:
            return
        self._last_poll = now
        self._reload.clear()
        current = self._serving.records.keys() if self._serving else set()
        active = {(r.name, r.version) for r in self._retry("read the registry", self.loader.registry.active_models)}
        if active == set(current):
            return
        if not active:  # every version retired on purpose (`coilguard models retire --force`): not a broken artifact
            serving = self._serving.describe() if self._serving else "nothing"
            log.warning("no model version is active in the registry; %s keeps serving until one is promoted", serving)
            return
        try:
            loaded = self._retry("load the ensemble", self.loader.load)
        except (*DATABASE_AWAY, _Stopped):
            raise
        except Exception as exc:  # a broken artifact, or a version retired between the two reads
            self.stats.refused_reloads += 1
            METRICS.refused_reloads.inc()
            wanted = ", ".join(f"{name} v{version}" for name, version in sorted(active)) or "none"
            log.error(
                "the registry's active models (%s) did not load: %s; %s keeps serving, trying again in %.0f s",
                wanted,
                exc,
                self._serving.describe() if self._serving else "nothing",
                RELOAD_POLL_S,
            )
            return
        previous, self._serving = self._serving, loaded
        if previous is not None:  # its last batch is voted: reloads happen on this thread, between batches
            previous.ensemble.close()
        self.stats.reloads += 1
        log.info("ensemble reloaded: %s", self._serving.describe())

    def _account(self, result: BatchResult, size: int, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.decided += len(result.decided)
        self.stats.rejected += len(result.rejected)
        self.stats.duplicates += len(result.duplicates)
        self.stats.republished += len(result.republished)
        if result.decided:
            self.last_decision_at = result.decided[-1].decided_at.isoformat()
        METRICS.observe_batch(result, size, seconds)
        if self.on_batch is not None:
            self.on_batch(result)


def _named(coil_ids: list[str], most: int = 20) -> str:
    return ", ".join(coil_ids[:most]) + (" …" if len(coil_ids) > most else "")


@dataclass
class _Held:
    """A decision the broker refused, and the messages of its coil to acknowledge once it is announced (kept
    without their payloads: the id, QoS and session are what an acknowledgement needs)."""

    out: Outgoing
    messages: list[Inbound]

    def hold(self, message: Inbound) -> None:
        """Keep ``message`` to acknowledge; not at QoS 0 (never acknowledged), nor twice (a redelivery within the
        session has the same id: acknowledged twice, the second could confirm another message given that id)."""
        if message.qos > 0 and not any((m.session, m.mid) == (message.session, message.mid) for m in self.messages):
            self.messages.append(replace(message, payload=b""))


class WorkerFailed(RuntimeError):
    """The worker could not go on (its committer failed); every coil it had not acknowledged is redelivered."""


class _Stopped(Exception):
    """The worker is stopping while the database is away: the batch stays unacknowledged."""


def _first_line(exc: Exception) -> str:
    """The driver's own words, e.g. "cannot execute INSERT in a read-only transaction": the class alone does not
    tell an operator a failover from an outage."""
    orig = getattr(exc, "orig", None)
    words = str(orig if orig is not None else exc).strip().splitlines()
    return f"{type(exc).__name__}: {words[0] if words else ''}"
