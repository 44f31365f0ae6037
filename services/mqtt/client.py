"""MQTT on paho-mqtt 2.x: connect from ``MQTT_URL``, QoS 1, manual acknowledgement, reconnect with backoff.

A worker that must never lose a coil uses a *persistent* session (``clean_start=False`` and a session
expiry): the broker keeps what arrives while the worker is away and redelivers every message the
worker received but never acknowledged. The worker acknowledges (``ack``) only after the result is
committed, so a crash between receipt and commit means redelivery, never loss.

The embedded broker (amqtt) speaks MQTT 3.1.1 only; there the client falls back to v3.1.1, where
shared subscriptions do not exist, which is harmless with one process.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from services.config import MqttUrl

log = logging.getLogger(__name__)

SHARED_PREFIX = "$share/"
SESSION_TAKEN_OVER = 0x8E  # MQTT v5 DISCONNECT reason: another connection came with the same client id
CONNECT_POLL_S = 0.2  # how often a connection the broker has not yet accepted looks for a stop
FLUSH_POLL_S = 0.5  # how often a wait for the broker's acknowledgements looks for a stop (a pod's grace is 30 s)


class ConnectCancelled(ConnectionError):
    """``connect`` gave up because its ``stop`` event was set, not because the broker is unreachable."""


@dataclass(slots=True)
class Inbound:
    """One received message; pass it back to :meth:`MqttClient.ack` once its result is safe."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float = field(default_factory=time.time)  # epoch seconds, for latency figures
    redelivered: bool = False
    session: int = 0  # the broker session it came in (MqttClient counts the sessions it was given anew)


MessageHandler = Callable[[Inbound], None]


class MqttClient:
    """One broker connection. ``on_message`` runs on paho's network thread: keep it short (enqueue)."""

    def __init__(
        self,
        url: MqttUrl | str,
        *,
        client_id: str | None = None,
        persistent: bool = False,
        session_expiry_s: int = 7 * 24 * 3600,
        manual_ack: bool = False,
        receive_maximum: int = 1000,
        on_message: MessageHandler | None = None,
    ) -> None:
        self.url = MqttUrl.parse(url) if isinstance(url, str) else url
        # ``?client_id=`` in the URL names the assess worker's persistent session (``worker_client_id``), not
        # every client of the URL: a publisher or listener under that id would take the worker's session over.
        self.client_id = client_id or f"coilguard-{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        self.v5 = not self.url.embedded
        self.persistent = persistent
        self.manual_ack = manual_ack
        self._on_message = on_message
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._closing = False
        self._last_publish: paho.MQTTMessageInfo | None = None
        self._session = 0  # bumped on every connection that finds no session of ours on the broker
        # (session, mid) of the messages handed on and not yet acknowledged (manual_ack, QoS 1 and 2): an id stays
        # the broker's for that message until its PUBACK, so another message under it is a redelivered copy
        self._unacked: set[tuple[int, int]] = set()
        self._refused: list[tuple[int, str]] = []  # (mid, reason) of PUBACKs that refused a message (v5), until taken
        self._pending_subacks: dict[int, threading.Event] = {}
        self._early_subacks: dict[int, float] = {}
        self._resubscribes: dict[int, str] = {}  # mid → topic of the subscriptions made again after a reconnect
        # topic → why the broker refused it when made again after a reconnect (its ACL changed), until it is granted:
        # the client is connected and receives nothing there, which the worker's readiness says
        self._refused_topics: dict[str, str] = {}

        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
            clean_session=None if self.v5 else not persistent,
            manual_ack=manual_ack,
        )
        self._connect_properties: Properties | None = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s if persistent else 0
            props.ReceiveMaximum = receive_maximum
            self._connect_properties = props
        if self.url.username:
            self._client.username_pw_set(self.url.username, self.url.password)
        if self.url.tls:
            self._client.tls_set_context(tls_context(self.url))
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.max_queued_messages_set(0)  # while disconnected, keep outgoing messages, never drop
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_publish = self._handle_publish
        self._client.on_socket_open = _no_delay

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout: float = 10.0, stop: threading.Event | None = None) -> MqttClient:
        """Connect and start the network thread; retries with backoff until ``timeout``. ``stop``: give up
        (:class:`ConnectCancelled`) once it is set, between attempts or while waiting for the broker's answer
        (an attempt under way, paho's socket connect of up to 5 s, is not cut short): a worker told to stop
        while the broker is down must not spend its grace period on connection attempts."""
        deadline = time.monotonic() + timeout
        stop = stop or threading.Event()
        delay = 0.2
        while True:
            try:
                if self.v5:
                    self._client.connect(
                        self.url.host,
                        self.url.port,
                        keepalive=30,
                        clean_start=not self.persistent,
                        properties=self._connect_properties,
                    )
                else:
                    self._client.connect(self.url.host, self.url.port, keepalive=30)
                break
            except OSError as exc:
                out_of_time = time.monotonic() + delay > deadline
                if stop.is_set() or (not out_of_time and stop.wait(delay)):  # a stop wins over the deadline
                    raise ConnectCancelled(f"stopped while connecting to {self.url.redacted()}: {exc}") from exc
                if out_of_time:
                    raise ConnectionError(f"MQTT broker {self.url.redacted()} unreachable: {exc}") from exc
                delay = min(delay * 2, 5.0)
        self._client.loop_start()
        accept_by = max(deadline, time.monotonic() + 0.5)
        while not self.connected.wait(CONNECT_POLL_S):
            if stop.is_set() or time.monotonic() >= accept_by:
                self._closing = True  # given up, not lost: no "reconnecting" in the log
                self._client.disconnect()
                self._client.loop_stop()
                if stop.is_set():
                    raise ConnectCancelled(f"stopped while {self.url.redacted()} had not accepted the connection")
                raise ConnectionError(f"MQTT broker {self.url.redacted()} did not accept the connection")
        return self

    def close(self) -> None:
        self._closing = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self.connected.clear()

    def __enter__(self) -> MqttClient:
        return self.connect() if not self.connected.is_set() else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ messaging

    def network_alive(self) -> bool:
        """Is paho's network thread (reading, keepalive, reconnecting) running? It ends on :meth:`close`, and
        otherwise only when an exception escaped it: from paho itself, or from one of this class's callbacks
        other than the message handler's (which is guarded). From then on nothing arrives and no reconnect is
        tried, and only a restart of the process brings the client back; a lost connection, a broker that
        refuses the credentials or takes the session over, leave it running (reconnecting). Paho names the
        thread nowhere public."""
        thread = getattr(self._client, "_thread", None)
        return thread is not None and thread.is_alive()

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe (waiting for the broker's SUBACK when connected) and again after every reconnect.

        ``$share/…`` degrades to a plain subscription on MQTT 3.1.1.
        """
        topic = self._supported(topic)
        with self._lock:
            self._subscriptions[topic] = qos
        if not self.connected.is_set():
            return
        done = threading.Event()
        result, mid = self._client.subscribe(topic, qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"subscribe to {topic} failed: {paho.error_string(result)}")
        with self._lock:
            if self._early_subacks.pop(mid, None) is not None:  # the SUBACK beat us here
                done.set()
            else:
                self._pending_subacks[mid] = done
        if not done.wait(timeout):
            raise ConnectionError(f"broker did not confirm the subscription to {topic}")

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic`` (and do not subscribe again after a reconnect)."""
        topic = self._supported(topic)
        with self._lock:
            self._subscriptions.pop(topic, None)
            self._refused_topics.pop(topic, None)  # not wanted any more: no reason to be unready for it
        if self.connected.is_set():
            result, _ = self._client.unsubscribe(topic)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"unsubscribe from {topic} failed: {paho.error_string(result)}")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        """Publish; while the connection is down a QoS 1 message waits in the client and goes out on reconnect."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            # paho keeps the message (no queue limit is set) and re-sends it after the reconnect, but leaves this
            # code on its info for good, and then its is_published() and wait_for_publish() raise even once the
            # broker has acknowledged it. The message is queued, which is what success means here.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        self._last_publish = info
        return info

    def flush(self, timeout: float = 30.0, stop: threading.Event | None = None) -> bool:
        """Wait until the broker has acknowledged everything published so far (QoS 1 is acked in order),
        including what was published while the connection was down and is re-sent after the reconnect. False
        after ``timeout``, or once ``stop`` is set (seen within ``FLUSH_POLL_S``; one such wait even when it is
        set already, so that a stopping worker still gives its last batch that long)."""
        last = self._last_publish
        if last is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            last.wait_for_publish(max(min(left, FLUSH_POLL_S) if stop is not None else left, 0))
            if last.is_published():
                return True
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return False

    def take_refused(self) -> list[tuple[int, str]]:
        """(message id, reason) of each message the broker refused since the last call (``Not authorized``: its
        ACL), and forget them; the id is the ``mid`` of what :meth:`publish` returned. paho counts a refused QoS 1
        message as published, so :meth:`flush` alone says True for a decision that went nowhere."""
        with self._lock:
            refused, self._refused = self._refused, []
        return refused

    @property
    def refused_subscription(self) -> str | None:
        """Why the client receives nothing on some of its topics although connected: the subscriptions the broker
        refused when they were made again after a reconnect (None when every one was granted)."""
        with self._lock:
            refused = dict(self._refused_topics)
        if not refused:
            return None
        return "the broker refused subscriptions made again on reconnecting: " + "; ".join(
            f"{topic} ({why})" for topic, why in sorted(refused.items())
        )

    def ack(self, message: Inbound) -> None:
        """Acknowledge a message received with ``manual_ack``; a no-op for QoS 0.

        Not for a message of a session the broker has since forgotten (it lost its state, or the session
        expired): message ids start again at 1 in the new one, and the old id would acknowledge a new message
        not yet safe. The broker no longer expects that acknowledgement anyway."""
        if not (self.manual_ack and message.qos > 0):
            return
        if message.session != self._session:
            log.debug("not acknowledging message %d of an earlier broker session", message.mid)
            return
        with self._lock:
            self._unacked.discard((message.session, message.mid))
        self._client.ack(message.mid, message.qos)

    def _supported(self, topic: str) -> str:
        if not self.v5 and topic.startswith(SHARED_PREFIX):
            return topic.split("/", 2)[2]
        return topic

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT connection to %s refused: %s", self.url.redacted(), reason_code)
            return
        with self._lock:
            if not flags.session_present:
                self._session += 1
                self._unacked.clear()  # the broker forgot them: it sends none again, and their ids start afresh
            subscriptions = list(self._subscriptions.items())
            self._resubscribes.clear()  # of a connection lost before their SUBACKs came: those will not come
        for topic, qos in subscriptions:
            _, mid = client.subscribe(topic, qos)
            with self._lock:
                self._resubscribes[mid] = topic
        log.info(
            "MQTT connected to %s as %s (session present: %s)",
            self.url.redacted(),
            self.client_id,
            flags.session_present,
        )
        self.connected.set()

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:
            with self._lock:
                self._refused.append((mid, str(reason_code)))

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        with self._lock:
            again = self._resubscribes.pop(mid, None)
            if again is not None:  # nobody waits for it; kept, its id would one day answer another subscribe's wait
                if failed:
                    self._refused_topics[again] = ", ".join(map(str, failed))
                else:
                    self._refused_topics.pop(again, None)
        if failed:
            log.error("MQTT subscription %d%s refused: %s", mid, f" to {again}" if again else "", failed)
        if failed or again is not None:
            return
        with self._lock:
            event = self._pending_subacks.pop(mid, None)
            if event is None:
                self._early_subacks[mid] = time.monotonic()
        if event is not None:
            event.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self._closing:
            return
        if getattr(reason_code, "value", None) == SESSION_TAKEN_OVER:
            log.error(
                "MQTT client id %s is in use by another client, which took this session over; "
                "give every worker its own client id (--client-id or COILGUARD_MQTT_CLIENT_ID)",
                self.client_id,
            )
        log.warning("MQTT connection to %s lost (%s); reconnecting", self.url.redacted(), reason_code)

    def _handle_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        if self._on_message is None:
            return
        if self.manual_ack and message.qos > 0:
            # After a reconnect the broker sends every unacknowledged message of the session again (DUP set). Those
            # still in the worker's hands (a batch waiting out a database outage) would be queued twice, a flapping
            # link adding up to the receive maximum of payloads each time, and acknowledged twice; the one in hand
            # is acknowledged once its result is safe. Only a copy marked DUP, and only on MQTT 5: the embedded
            # broker (3.1.1, amqtt) sends nothing again but frees an id unacknowledged for 5 s and hands it to a
            # new message, which must not be taken for a copy.
            with self._lock:
                key = (self._session, message.mid)
                if self.v5 and message.dup and key in self._unacked:
                    log.debug("message %d sent again while still being worked on: the copy is dropped", message.mid)
                    return
                self._unacked.add(key)
        inbound = Inbound(
            topic=message.topic,
            payload=message.payload,
            mid=message.mid,
            qos=message.qos,
            redelivered=bool(message.dup),
            session=self._session,
        )
        try:
            self._on_message(inbound)
        except Exception:  # a handler bug must not kill paho's network thread
            log.exception("message handler failed for %s", message.topic)
            with self._lock:  # not in hand: a copy sent after the next reconnect is taken
                self._unacked.discard((inbound.session, inbound.mid))


def tls_context(url: MqttUrl) -> ssl.SSLContext:
    """The system's certificate authorities, and those of ``url.ca`` beside them (paho's ``tls_set(ca_certs=…)``
    would trust that file alone: a broker with a public certificate, or a file holding only an intermediate,
    would then fail). ``tls_insecure``: no check at all, for a test broker."""
    context = ssl.create_default_context()
    if url.ca:
        context.load_verify_locations(url.ca)
    if url.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def forget_session(url: MqttUrl | str, client_id: str) -> None:
    """Drop a persistent session (and what the broker queued for it): connect once with a clean start."""
    MqttClient(url, client_id=client_id, persistent=False).connect().close()


def clear_retained(url: str, prefix: str, wait_s: float = 0.5) -> int:
    """Remove every retained message under ``prefix/#``; returns how many were cleared."""
    seen: set[str] = set()

    def collect(message: Inbound) -> None:
        if message.payload:
            seen.add(message.topic)

    with MqttClient(url, on_message=collect) as client:
        client.subscribe(f"{prefix}/#", qos=0)
        time.sleep(wait_s)
        for topic in seen:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(2)
    return len(seen)


def _no_delay(client, userdata, sock) -> None:
    """Switch Nagle's algorithm off on the broker connection (paho leaves it on).

    With Nagle on, a small packet waits until everything sent before it is acknowledged by TCP. A
    worker's manual PUBACK gets no MQTT reply, so the broker acknowledges it only when its delayed-ACK
    timer fires (40 ms on Linux), and the next decision the worker publishes waits that long.
    """
    with contextlib.suppress(OSError, AttributeError):  # a websocket or an exotic socket: leave it
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
