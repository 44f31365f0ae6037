"""The embedded broker (amqtt) used when ``MQTT_URL=embedded``: a real MQTT server inside the process.

It lets ``coilguard up`` and ``coilguard demo`` run on one machine with nothing installed, and any
ordinary MQTT client on the machine can still connect to it (127.0.0.1, port 18830 by default; the demo
takes a free port of its own). It is not for production, and it does not keep QoS 1's promises as Mosquitto
does: it speaks MQTT 3.1.1 only and keeps nothing on disk; it keeps no session for a client that disconnects
(amqtt treats every anonymous client's session as clean), so what is published while a subscriber is away is
not kept for it; and it gives up on a message whose acknowledgement has not come within 5 s (amqtt's fixed
wait), never sending it again. A running worker loses nothing by that (it holds what it received until the
decision is stored), but a worker that `coilguard up` restarts after a failure has lost the coils it held and
those published before it is back. Run Mosquitto (``MQTT_URL=mqtt://…``) where that matters.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from amqtt.broker import Broker

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """The embedded broker did not start."""


class EmbeddedBroker:
    """An amqtt broker on its own event-loop thread; ``start()`` returns once it accepts connections."""

    def __init__(self, host: str = "127.0.0.1", port: int = 18830) -> None:
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedded-broker", daemon=True)
        self._broker: Broker | None = None

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        # amqtt warns on every acknowledgement it already settled, and logs each message held unacknowledged for
        # over 5 s (a worker waiting for its first model holds every coil) as an ERROR with a traceback: what the
        # module docstring says, not news, and it buried the demo's output
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self._thread.start()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        async def _start() -> Broker:
            broker = Broker(config, loop=self._loop)
            await broker.start()
            return broker

        try:
            self._broker = asyncio.run_coroutine_threadsafe(_start(), self._loop).result(timeout)
        except Exception as exc:  # the port taken, most likely: the loop's thread must not stay behind
            self.stop()
            raise BrokerUnavailable(
                f"the embedded MQTT broker did not start on {self.host}:{self.port} ({type(exc).__name__}: {exc}); "
                "if another process holds the port (another `coilguard up`?), give this one another: "
                "COILGUARD_MQTT_URL=embedded://127.0.0.1:PORT"
            ) from exc
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout)
            except Exception:  # shutting down: nothing more to save
                log.debug("embedded broker shutdown raised", exc_info=True)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
