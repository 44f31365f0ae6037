"""The MQTT layer against a real Mosquitto: QoS 1, manual ack, redelivery after a crash, shared subscriptions."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from services.config import MqttUrl
from services.mqtt.client import Inbound, MqttClient, tls_context


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


def test_messages_still_in_hand_sent_again_after_a_reconnect_are_handed_on_once(
    mqtt_url: str, topic_prefix: str
) -> None:
    """The link drops while a worker holds unacknowledged coils (a batch waiting out a database outage). On the
    reconnect the broker sends them again under the same ids: handed on a second time, they were queued twice
    (a flapping link adding a receive maximum of payloads each time) and acknowledged twice."""
    from tcp_proxy import TcpProxy

    proxy, via_proxy = TcpProxy.in_front_of(mqtt_url, 1883)
    topic = f"{topic_prefix}/inhand/{uuid.uuid4().hex[:6]}"
    client_id = f"cg-inhand-{uuid.uuid4().hex[:6]}"
    got: list[Inbound] = []
    worker = MqttClient(via_proxy, client_id=client_id, persistent=True, manual_ack=True, on_message=got.append)
    worker.connect()
    try:
        worker.subscribe(topic)
        with MqttClient(mqtt_url) as pub:
            for i in range(3):
                pub.publish(topic, str(i).encode())
            assert pub.flush(5) and _wait_for(lambda: len(got) == 3)
            for _ in range(2):  # twice: each reconnect would have added three copies
                proxy.cut()
                assert _wait_for(lambda: not worker.connected.is_set())
                proxy.restore()
                assert _wait_for(worker.connected.is_set, timeout=40)
                time.sleep(1.0)  # what the broker sends again has arrived
            pub.publish(topic, b"3")  # a new message after the reconnects is handed on as ever
            assert pub.flush(5) and _wait_for(lambda: len(got) == 4)
            time.sleep(0.3)
        assert [m.payload for m in got] == [b"0", b"1", b"2", b"3"]
        for m in got:
            worker.ack(m)
        time.sleep(0.3)
    finally:
        worker.close()
        proxy.cut()
    again: list[Inbound] = []  # every message acknowledged once, and none owed any more
    with MqttClient(mqtt_url, client_id=client_id, persistent=True, manual_ack=True, on_message=again.append):
        time.sleep(1.0)
    assert again == []
    MqttClient(mqtt_url, client_id=client_id).connect().close()


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


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A plant CA and a broker certificate it signed for 127.0.0.1 (the CA file, the broker's cert and key)."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "broker.key", "broker.csr", "broker.pem"))
    ext = folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2", "-subj",
         "/CN=coilguard test plant CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


def test_a_broker_certified_by_a_plant_ca_is_trusted_through_the_url(tmp_path: Path) -> None:
    """`mqtts://…?ca=/path/ca.pem`: a real Mosquitto with a TLS listener whose certificate a CA of the test's own
    signed. Without `ca=` the client refuses it (the system store does not know that CA), with it the round trip
    works, and certificate checking stays on."""
    mosquitto = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).is_file()), None)
    if mosquitto is None or shutil.which("openssl") is None:
        pytest.skip("needs the mosquitto and openssl programs to run a TLS broker of its own")
    ca, cert, key = _tls_files(tmp_path)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        "persistence false\n" + ("user root\n" if os.geteuid() == 0 else "")
        # started as root, Mosquitto would read them as its own user, `mosquitto`, barred from pytest's folders
    )
    broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not _wait_for(lambda: _port_open(port), timeout=10):
            broker.terminate()
            pytest.fail(f"the TLS broker did not start: {broker.communicate(timeout=10)[1].decode()[-1500:]}")
        with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            MqttClient(f"mqtts://127.0.0.1:{port}").connect(timeout=2)
        url = f"mqtts://127.0.0.1:{port}?ca={ca}"
        system = ssl.create_default_context().cert_store_stats()["x509_ca"]
        assert tls_context(MqttUrl.parse(url)).cert_store_stats()["x509_ca"] == system + 1  # beside, not instead
        got: list[Inbound] = []
        with MqttClient(url, on_message=got.append) as sub, MqttClient(url) as pub:
            sub.subscribe("plant/tls")
            time.sleep(0.2)
            pub.publish("plant/tls", b"over TLS")
            assert pub.flush(5) and _wait_for(lambda: len(got) == 1)
        assert got[0].payload == b"over TLS"
    finally:
        broker.terminate()
        broker.wait(10)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0
