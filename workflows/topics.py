"""Topic names of DESIGN §3 under a configurable prefix (``coilguard`` by default)."""

from __future__ import annotations

from dataclasses import dataclass

ASSESS_GROUP = "coilguard-assess"


@dataclass(frozen=True)
class Topics:
    prefix: str = "coilguard"

    def sensors(self, line: str) -> str:
        return f"{self.prefix}/sensors/{line}/matrix"

    @property
    def all_sensors(self) -> str:
        return f"{self.prefix}/sensors/+/matrix"

    def shared_sensors(self, group: str = ASSESS_GROUP) -> str:
        """N AssessCoils replicas subscribed to this split the stream between them (MQTT v5)."""
        return f"$share/{group}/{self.all_sensors}"

    def decisions(self, line: str) -> str:
        return f"{self.prefix}/decisions/{line}"

    @property
    def all_decisions(self) -> str:
        return f"{self.prefix}/decisions/+"

    def rejected(self, line: str | None) -> str:
        return f"{self.prefix}/rejected/{line or 'unknown'}"

    @property
    def all_rejected(self) -> str:
        return f"{self.prefix}/rejected/+"

    @property
    def model_events(self) -> str:
        return f"{self.prefix}/events/models"

    def line_of(self, sensor_topic: str) -> str | None:
        """The ``{line}`` level of a sensor topic, or None when the topic is not one."""
        head = f"{self.prefix}/sensors/"
        if sensor_topic.startswith(head) and sensor_topic.endswith("/matrix"):
            line = sensor_topic[len(head) : -len("/matrix")]
            return line if line and "/" not in line else None
        return None
