"""The MQTT layer against a real Mosquitto: QoS 1, manual ack, redelivery after a crash, shared subscriptions."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

from services.mqtt.client import Inbound, MqttClient


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_publish_subscribe_round_trip(mqtt_url: str, topic_prefix: str) -> None:
    got: list[Inbound] = []
    topic = f"{topic_prefix}/rt/{uuid.uuid4().hex[:6]}"
    with MqttClient(mqtt_url, on_message=got.append) as sub, MqttClient(mqtt_url) as pub:
        sub.subscribe(topic)
        time.sleep(0.2)
        for i in range(50):
            pub.publish(topic, f"m{i}".encode())
        assert pub.flush(5)
        assert _wait_for(lambda: len(got) == 50)
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(50)]
    assert all(m.qos == 1 for m in got)


def test_unacked_messages_are_redelivered_after_a_crash(mqtt_url: str, topic_prefix: str) -> None:
    """A worker killed with SIGKILL before acking gets the same messages again when it comes back."""
    topic = f"{topic_prefix}/crash/{uuid.uuid4().hex[:6]}"
    client_id = f"cg-crash-{uuid.uuid4().hex[:6]}"
    worker = textwrap.dedent(
        f"""
        import sys, time
        from services.mqtt.client import MqttClient
        got = []
        c = MqttClient({mqtt_url!r}, client_id={client_id!r}, persistent=True, manual_ack=True,
                       on_message=got.append).connect()
        c.subscribe({topic!r})
        print("ready", flush=True)
        while len(got) < 20:
            time.sleep(0.01)
        for m in got[:5]:
            c.ack(m)
        time.sleep(0.5)
        print("received", len(got), flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with MqttClient(mqtt_url) as pub:
            for i in range(20):
                pub.publish(topic, str(i).encode())
            assert pub.flush(5)
        assert proc.stdout.readline().strip() == "received 20"
    finally:
        proc.kill()
        proc.wait()

    got: list[Inbound] = []
    with MqttClient(mqtt_url, client_id=client_id, persistent=True, manual_ack=True, on_message=got.append) as again:
        again.subscribe(topic)
        assert _wait_for(lambda: len(got) >= 15)
        time.sleep(0.3)
        for m in got:
            again.ack(m)
    assert sorted(int(m.payload) for m in got) == list(range(5, 20))
    MqttClient(mqtt_url, client_id=client_id).connect().close()  # clean_start: forget the session


def test_what_is_published_while_the_broker_is_away_goes_out_and_is_confirmed_after_the_reconnect(
    mqtt_url: str, topic_prefix: str
) -> None:
    """A worker announces decisions while its connection is down: they wait in the client, reach the broker
    after the reconnect, and ``flush`` then says so (it must neither raise nor wait for ever)."""
    from tcp_proxy import TcpProxy

    proxy, via_proxy = TcpProxy.in_front_of(mqtt_url, 1883)
    topic = f"{topic_prefix}/away/{uuid.uuid4().hex[:6]}"
    got: list[Inbound] = []
    with MqttClient(mqtt_url, on_message=got.append) as sub, MqttClient(via_proxy) as pub:
        sub.subscribe(topic)
        pub.publish(topic, b"before")
        assert pub.flush(5)
        proxy.cut()
        assert _wait_for(lambda: not pub.connected.is_set())
        for i in range(3):
            pub.publish(topic, f"away{i}".encode())
        assert not pub.flush(0.5), "nothing can be confirmed while the broker is away"
        proxy.restore()
        assert pub.flush(15)
        assert _wait_for(lambda: len(got) == 4)
    proxy.cut()
    assert [m.payload for m in got] == [b"before", b"away0", b"away1", b"away2"]


def test_shared_subscription_splits_the_stream(mqtt_url: str, topic_prefix: str) -> None:
    a: list[Inbound] = []
    b: list[Inbound] = []
    group = f"$share/g{uuid.uuid4().hex[:6]}/{topic_prefix}/split/+"
    with MqttClient(mqtt_url, on_message=a.append) as ca, MqttClient(mqtt_url, on_message=b.append) as cb:
        ca.subscribe(group)
        cb.subscribe(group)
        time.sleep(0.3)
        with MqttClient(mqtt_url) as pub:
            for i in range(100):
                pub.publish(f"{topic_prefix}/split/line{i % 3}", str(i).encode())
            assert pub.flush(5)
        assert _wait_for(lambda: len(a) + len(b) == 100)
    assert a and b, "both members must get a share"
    assert sorted(int(m.payload) for m in a + b) == list(range(100))


def test_connect_to_nothing_fails_clearly() -> None:
    started = time.monotonic()
    try:
        MqttClient("mqtt://127.0.0.1:1").connect(timeout=1.0)
    except ConnectionError as exc:
        assert "127.0.0.1:1" in str(exc)
    else:
        raise AssertionError("connecting to a closed port must fail")
    assert time.monotonic() - started < 5


def test_a_message_the_broker_refuses_is_reported_though_paho_counts_it_published(
    mqtt_url: str, topic_prefix: str
) -> None:
    """Mosquitto refuses a publish to $SYS with PUBACK "Not authorized", as its ACL refuses a topic it does not
    cover. paho marks such a message published, so flush() is True: take_refused() is where the refusal shows."""
    with MqttClient(mqtt_url) as client:
        info = client.publish("$SYS/coilguard-test/refused", b"{}", qos=1)
        assert client.flush(10)
        assert client.take_refused() == [(info.mid, "Not authorized")]
        assert client.take_refused() == []  # taken once
        client.publish(f"{topic_prefix}/accepted", b"{}", qos=1)
        assert client.flush(10) and client.take_refused() == []


def test_an_acknowledgement_for_a_session_the_broker_forgot_is_not_sent_into_the_new_one(
    mqtt_url: str, topic_prefix: str
) -> None:
    """The broker loses a worker's session (it crashed before saving it, or the session expired while the worker
    was cut off). Message ids start again at 1 in the new session, so acknowledging a message of the old one
    by its id would acknowledge a new message that is not yet safe: a crash would then lose it."""
    from tcp_proxy import TcpProxy

    proxy, via_proxy = TcpProxy.in_front_of(mqtt_url, 1883)
    topic = f"{topic_prefix}/forgotten/{uuid.uuid4().hex[:6]}"
    client_id = f"cg-forgotten-{uuid.uuid4().hex[:6]}"
    got: list[Inbound] = []
    worker = MqttClient(
        via_proxy, client_id=client_id, persistent=True, session_expiry_s=2, manual_ack=True, on_message=got.append
    ).connect()
    try:
        worker.subscribe(topic)
        with MqttClient(mqtt_url) as pub:
            pub.publish(topic, b"old")
            assert pub.flush(5) and _wait_for(lambda: len(got) == 1)
            proxy.cut()  # the broker forgets the session, and "old" with it, 2 s after the connection is gone
            assert _wait_for(lambda: not worker.connected.is_set())
            time.sleep(3.5)
            proxy.restore()
            assert _wait_for(worker.connected.is_set, timeout=40)
            time.sleep(0.5)  # subscribed again
            pub.publish(topic, b"new")
            assert pub.flush(5) and _wait_for(lambda: len(got) == 2)
        old, new = got
        assert new.mid == old.mid  # the new session numbers from 1 again: the old id is the new message's
        worker.ack(old)
        time.sleep(0.3)
    finally:
        worker.close()
        proxy.cut()
    again: list[Inbound] = []  # within the 2 s the session outlives the connection: "new" must still be owed
    with MqttClient(mqtt_url, client_id=client_id, persistent=True, manual_ack=True, on_message=again.append) as c:
        assert _wait_for(lambda: len(again) == 1, timeout=5), "the new message was acknowledged by the old one's id"
        assert again[0].payload == b"new"
        c.ack(again[0])
    MqttClient(mqtt_url, client_id=client_id).connect().close()
