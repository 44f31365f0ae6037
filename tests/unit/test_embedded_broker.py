"""The embedded broker (amqtt) is a real MQTT server: an ordinary paho client can talk through it."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from infra import free_ports

from services.config import MqttUrl
from services.mqtt.broker import BrokerUnavailable, EmbeddedBroker
from services.mqtt.client import Inbound, MqttClient


def test_embedded_broker_carries_qos1_messages_and_shared_topics_degrade() -> None:
    port = free_ports()[0]
    url = MqttUrl(scheme="embedded", port=port)
    got: list[Inbound] = []
    with (
        EmbeddedBroker(port=port),
        MqttClient(url, on_message=got.append, manual_ack=True) as sub,
        MqttClient(url) as pub,
    ):
        sub.subscribe("$share/g/cg/sensors/+/matrix")  # v3.1.1 broker: becomes a plain subscription
        time.sleep(0.2)
        for i in range(30):
            pub.publish(f"cg/sensors/l{i % 2}/matrix", str(i).encode())
        deadline = time.monotonic() + 10
        while len(got) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        for m in got:
            sub.ack(m)
    assert sorted(int(m.payload) for m in got) == list(range(30))


def test_a_port_already_taken_is_said_with_the_way_out_and_leaves_no_thread_behind() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(port=port)
        with pytest.raises(BrokerUnavailable, match=rf"did not start on 127\.0\.0\.1:{port} .*embedded://127"):
            broker.start(timeout=10)
    assert not broker._thread.is_alive()
    assert "embedded-broker" not in {t.name for t in threading.enumerate()}
