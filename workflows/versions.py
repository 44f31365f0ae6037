"""Putting a registered version in service by hand, or taking one out of service.

ReTrain promotes its own challengers. A plant also needs to do this by hand: roll back a retrained version
that the operators disagree with, bring back an earlier one, or retire a version whose files are gone. Without
these functions that meant SQL on the ``models`` table. A version is checked before it is promoted: its
artifact must load and match the checksum in the registry, so a rollback never puts a version in service that
the workers would refuse. Workers reload when they receive the model event, or at their next registry poll if
the event is lost.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ml.assessors.manifest import ArtifactError
from workflows.messages import ModelEvent, ModelEventKind, dumps
from workflows.ports import NO_ACTIVE_VERSION, ChampionChanged, ModelRecord, ModelRegistry, Publisher
from workflows.training import load_model, resolve_artifact

log = logging.getLogger(__name__)


class VersionChangeRefused(ValueError):
    """The change would do nothing, or would put in service a version the workers cannot load."""


@dataclass(frozen=True)
class VersionChange:
    """What changed. ``retired`` is the version taken out of service, if any; ``name_active`` whether the name
    still has an active version (if not, the ensemble votes without it); ``active_left`` counts the versions of
    any name still active (0: the workers have no model to load any more)."""

    name: str
    promoted: int | None
    retired: int | None
    name_active: bool
    active_left: int
    warnings: tuple[str, ...] = ()  # done, but something the operator should see to


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
    checking that the version's artifact loads. Refused if another change to the name comes in between."""
    records = registry.all([name])
    record = _find(records, name, version)
    if record.status == "active":
        raise VersionChangeRefused(f"{name} v{version} is already active")
    active = [r.id for r in records if r.status == "active"]
    claim_files(resolve_artifact(model_dir, record.artifact_uri))
    try:
        assessor = load_model(record, model_dir)
    except (ArtifactError, OSError) as exc:
        raise VersionChangeRefused(f"{name} v{version} cannot be put in service: {exc}") from None
    except Exception as exc:  # checksums fine, but this release cannot build it (its settings, its network)
        raise VersionChangeRefused(
            f"{name} v{version} cannot be put in service by this release: {type(exc).__name__}: {exc}"
        ) from None
    warnings: list[str] = []
    if kept := assessor.training_data.get("path"):  # what a later ReTrain adds the operators' coils to
        if (Path(model_dir) / kept).is_file():
            claim_files(Path(model_dir) / kept)
        else:  # it can serve; only its next ReTrain would fail
            warnings.append(
                f"its training set {Path(model_dir) / kept} is gone (pruned, or another volume): ReTrain of this "
                "version fails until it is restored from a copy of MODEL_DIR"
            )
    try:  # only over the version seen above: loading takes a while, and ReTrain may promote meanwhile
        retired = registry.promote(record.id, replacing=active[0] if active else NO_ACTIVE_VERSION)
    except ChampionChanged as exc:
        raise VersionChangeRefused(f"{exc}: nothing was changed; look again with `coilguard models`") from None
    events: list[tuple[ModelEventKind, int]] = [("retired", retired.version)] if retired is not None else []
    announce(publisher, model_events, name, [*events, ("promoted", version)])
    return _change(registry, name, version, retired.version if retired else None, warnings)


def retire_version(
    registry: ModelRegistry,
    name: str,
    version: int,
    *,
    force: bool = False,
    publisher: Publisher | None = None,
    model_events: str | None = None,
) -> VersionChange:
    """Take ``name`` v``version`` out of service (or out of the candidates). Retiring the last active version of
    every name needs ``force``: the workers cannot decide without a model, so they would keep serving it."""
    record = _find(registry.all([name]), name, version)
    if record.status == "retired":
        raise VersionChangeRefused(f"{name} v{version} is already retired")
    if record.status == "active" and not force and [r.id for r in registry.active_models()] == [record.id]:
        raise VersionChangeRefused(
            f"{name} v{version} is the only active version of any model: the workers would keep serving it, as "
            "nothing else can decide. Promote its successor instead (`coilguard models promote`), or retire it "
            "anyway with --force"
        )
    if not registry.set_status(record.id, "retired", was=record.status):  # promoted or retired meanwhile
        raise VersionChangeRefused(
            f"{name} v{version} changed while this was decided (it was {record.status}): nothing was changed; "
            "look again with `coilguard models`"
        )
    if record.status == "active":
        announce(publisher, model_events, name, [("retired", version)])
    return _change(registry, name, None, version)


def claim_files(path: Path) -> None:
    """Date ``path`` now: a version about to be put back in service is, to a prune under way, a retired one like
    any other, and the prune leaves alone whatever changed within its grace period (it looks again just before
    it deletes). Where this process cannot write to the store, a prune elsewhere could still take the files."""
    try:
        os.utime(path)
    except OSError as exc:
        log.warning("could not date %s anew (%s): a prune running now could still remove it", path, exc)


def _find(records: list[ModelRecord], name: str, version: int) -> ModelRecord:
    for record in records:
        if record.version == version:
            return record
    known = ", ".join(f"v{r.version} ({r.status})" for r in records) or "none"
    raise VersionChangeRefused(f"no version {version} of a model named {name!r} (registered: {known})")


def _change(
    registry: ModelRegistry, name: str, promoted: int | None, retired: int | None, warnings: list[str] | None = None
) -> VersionChange:
    active = registry.active_models()
    return VersionChange(
        name, promoted, retired, any(r.name == name for r in active), len(active), tuple(warnings or ())
    )


def announce(
    publisher: Publisher | None, topic: str | None, name: str, events: list[tuple[ModelEventKind, int]]
) -> None:
    """Publish ``(event, version)`` model events for ``name`` together (ReTrain's promotions too); nothing without
    a publisher."""
    if publisher is None or topic is None:
        return
    now = datetime.now(UTC)
    publisher.publish([(topic, dumps(ModelEvent(event=event, model=name, version=v, at=now))) for event, v in events])
