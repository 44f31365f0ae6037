"""The MQTT client's handling of a message id it already holds (Mosquitto's side: tests/integration/test_mqtt.py)."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest

from services.mqtt.client import Inbound, MqttClient


def _message(mid: int, dup: bool) -> paho.MQTTMessage:
    message = paho.MQTTMessage(mid=mid, topic=b"cg/sensors/galv-1")
    message.qos, message.payload, message.dup = 1, b"{}", dup
    return message


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1883", "embedded"])
def test_only_a_copy_marked_dup_of_a_message_in_hand_is_dropped_and_only_on_mqtt5(url: str) -> None:
    """MQTT 5 (Mosquitto): the broker sends a message again, DUP set, after a reconnect; the worker still holds the
    first copy. The embedded broker (MQTT 3.1.1, amqtt) sends nothing again but frees an id left unacknowledged for
    5 s and gives it to a new message (a database outage in `coilguard up`): that one must be handed on."""
    got: list[Inbound] = []
    client = MqttClient(url, manual_ack=True, on_message=got.append)
    client._handle_message(None, None, _message(7, dup=False))
    client._handle_message(None, None, _message(7, dup=True))  # a resend of the message in hand
    client._handle_message(None, None, _message(7, dup=False))  # a new message under an id the broker freed
    assert len(got) == (2 if client.v5 else 3)


def test_a_subscription_the_broker_refuses_after_a_reconnect_is_what_readiness_says() -> None:
    """The ACL changed while a worker was connected: on its next reconnect the broker refuses one of its two
    subscriptions, and the worker, connected, receives nothing there. Was: logged once, the worker still ready (and
    with one refusal and one grant, the grant cleared it). A SUBACK of a subscription made again is not kept either:
    its id would one day answer another subscription's wait."""
    from types import SimpleNamespace

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    client = MqttClient("mqtt://127.0.0.1:1883", manual_ack=True)
    client._subscriptions = {"cg/events/models": 1, "$share/coilguard-assess/cg/sensors/+/matrix": 1}
    mids = iter(range(40, 50))
    paho_side = SimpleNamespace(subscribe=lambda topic, qos: (0, next(mids)))
    connected, granted = ReasonCode(PacketTypes.CONNACK, "Success"), ReasonCode(PacketTypes.SUBACK, "Granted QoS 1")

    def reconnect(*answers: ReasonCode) -> None:
        client._handle_connect(paho_side, None, SimpleNamespace(session_present=True), connected, None)
        for mid, answer in zip(sorted(client._resubscribes), answers, strict=True):
            client._handle_subscribe(None, None, mid, [answer], None)

    reconnect(ReasonCode(PacketTypes.SUBACK, "Not authorized"), granted)
    refused = client.refused_subscription
    assert refused is not None and "cg/events/models (Not authorized)" in refused and "sensors" not in refused
    client.connected.clear()  # offline: unsubscribing only forgets the topic, and with it the refusal
    client.unsubscribe("cg/events/models")
    assert client.refused_subscription is None
    client._subscriptions["cg/events/models"] = 1
    client._resubscribes[39] = "cg/events/models"  # a connection lost before its SUBACK came: forgotten at the next
    reconnect(granted, granted)
    assert client.refused_subscription is None and not client._early_subacks and not client._resubscribes
