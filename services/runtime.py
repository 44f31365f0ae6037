"""What a command needs at run time: settings, database, broker, and the embedded broker when asked for."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.config import MqttUrl, Settings
from services.mqtt.broker import EmbeddedBroker
from services.mqtt.client import MqttClient
from workflows.topics import Topics


@contextlib.contextmanager
def broker_for(settings: Settings, *, host_embedded: bool) -> Iterator[MqttUrl]:
    """Yield the broker URL to connect to.

    ``MQTT_URL=embedded`` means the broker inside ``coilguard up``/``demo``: those commands pass
    ``host_embedded=True`` and run it; every other command connects to the one they run.
    """
    url = settings.mqtt
    if url.embedded and host_embedded:
        with EmbeddedBroker(port=url.port):
            yield url
    else:
        yield url


def topics(settings: Settings) -> Topics:
    return Topics(settings.mqtt_topic_prefix)


def mqtt_client(settings: Settings, url: MqttUrl | None = None, **kwargs: object) -> MqttClient:
    """A client of the configured broker; under its own client id unless ``client_id`` is given (the worker's
    id, from ``worker_client_id``, is for the worker's session alone)."""
    return MqttClient(url or settings.mqtt, **kwargs)  # type: ignore[arg-type]
