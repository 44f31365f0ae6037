"""Putting a registered version in service by hand, or taking one out of service.

ReTrain promotes its own challengers. A plant also needs to do this by hand: roll back a retrained version
that the operators disagree with, bring back an earlier one, or retire a version whose files are gone. Without
these functions that meant SQL on the ``models`` table. A version is checked before it is promoted: its
artifact must load and match the checksum in the registry, so a rollback never puts a version in service that
the workers would refuse. Workers reload when they receive the model event, or at their next registry poll if
the event is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ml.assessors.manifest import ArtifactError
from workflows.messages import ModelEvent, dumps
from workflows.ports import ModelRecord, ModelRegistry, Publisher
from workflows.training import load_model


class VersionChangeRefused(ValueError):
    """The change would do nothing, or would put in service a version the workers cannot load."""


@dataclass(frozen=True)
class VersionChange:
    """What changed. ``retired`` is the version taken out of service, if any. ``active_left`` counts the
    versions of any name still active afterwards: 0 means the workers have no model to load any more."""

    name: str
    promoted: int | None
    retired: int | None
    active_left: int


def find_version(registry: ModelRegistry, name: str, version: int) -> ModelRecord:
    records = registry.all([name])
    for record in records:
        if record.version == version:
            return record
    known = ", ".join(f"v{r.version} ({r.status})" for r in records) or "none"
    raise VersionChangeRefused(f"no version {version} of a model named {name!r} (registered: {known})")


def promote_version(
    registry: ModelRegistry,
    model_dir: Path,
    name: str,
    version: int,
    *,
    publisher: Publisher | None = None,
    model_events: str | None = None,
) -> VersionChange:
    """Activate ``name`` v``version`` and retire the name's active version in the same transaction, after
    checking that the version's artifact loads."""
    record = find_version(registry, name, version)
    if record.status == "active":
        raise VersionChangeRefused(f"{name} v{version} is already active")
    try:
        load_model(record, model_dir)
    except (ArtifactError, OSError) as exc:
        raise VersionChangeRefused(f"{name} v{version} cannot be put in service: {exc}") from None
    retired = registry.promote(record.id)
    events = [("retired", retired.version)] if retired is not None else []
    _announce(publisher, model_events, name, [*events, ("promoted", version)])
    return VersionChange(name, version, retired.version if retired else None, len(registry.active_models()))


def retire_version(
    registry: ModelRegistry,
    name: str,
    version: int,
    *,
    publisher: Publisher | None = None,
    model_events: str | None = None,
) -> VersionChange:
    """Take ``name`` v``version`` out of service (or out of the candidates)."""
    record = find_version(registry, name, version)
    if record.status == "retired":
        raise VersionChangeRefused(f"{name} v{version} is already retired")
    registry.set_status(record.id, "retired")
    if record.status == "active":
        _announce(publisher, model_events, name, [("retired", version)])
    return VersionChange(name, None, version, len(registry.active_models()))


def _announce(publisher: Publisher | None, topic: str | None, name: str, events: list[tuple[str, int]]) -> None:
    if publisher is None or topic is None:
        return
    now = datetime.now(UTC)
    publisher.publish(
        [(topic, dumps(ModelEvent(event=event, model=name, version=v, at=now))) for event, v in events]  # type: ignore[arg-type]
    )
