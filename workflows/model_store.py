"""Pruning ``MODEL_DIR``: what a plant running for years would otherwise fill its volume with.

Every promoted ReTrain challenger keeps a new version folder and a new training set (its history plus the
operators' coils: tens of MB, more each week), and nothing removed them. The registry rows stay: the history of
what served when is worth more than the bytes; only files go.

Kept: every active and candidate version; per name the newest ``keep`` retired ones (what a rollback would put
back); the training sets those versions' manifests name; and anything written in the last ``grace`` (a ReTrain
or ``train --register`` registering now writes its training set and a staging folder before its row exists).
Removed: the folders of the other retired and failed versions, training sets no kept version names, and the
staging folders and temporary files a killed registration left behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from ml.assessors.manifest import MANIFEST_FILE
from workflows.ports import ModelRecord
from workflows.training import DATA_DIR, resolve_artifact

log = logging.getLogger(__name__)

KEEP_RETIRED = 3  # retired versions kept per name: rollback targets
GRACE = timedelta(days=1)  # anything newer may belong to a registration under way


@dataclass
class PrunePlan:
    versions: list[tuple[ModelRecord, Path]] = field(default_factory=list)  # folders of versions to remove
    data: list[Path] = field(default_factory=list)  # training sets no kept version names
    leftovers: list[Path] = field(default_factory=list)  # staging folders and temporary files of dead registrations
    unreadable: list[str] = field(default_factory=list)  # kept versions whose manifest could not be read

    @property
    def paths(self) -> list[Path]:
        return [path for _, path in self.versions] + self.data + self.leftovers

    def size(self) -> int:
        return sum(_size(path) for path in self.paths)


def plan_prune(
    records: list[ModelRecord], model_dir: Path, keep: int = KEEP_RETIRED, grace: timedelta = GRACE
) -> PrunePlan:
    """What :func:`prune` would remove, read from the registry's ``records`` (every version) and the disk.

    Training sets are left alone when a kept version's manifest cannot be read: what it names is unknown."""
    model_dir = Path(model_dir)
    plan = PrunePlan()
    kept: list[ModelRecord] = []
    retired_seen: dict[str, int] = {}
    for record in sorted(records, key=lambda r: (r.name, -r.version)):
        if record.status in ("active", "candidate"):
            kept.append(record)
        elif record.status == "retired" and retired_seen.get(record.name, 0) < keep:
            retired_seen[record.name] = retired_seen.get(record.name, 0) + 1
            kept.append(record)
        elif (path := resolve_artifact(model_dir, record.artifact_uri)).is_dir() and _inside(path, model_dir):
            plan.versions.append((record, path))
    named: set[Path] = set()
    for record in kept:
        manifest = resolve_artifact(model_dir, record.artifact_uri) / MANIFEST_FILE
        if not manifest.is_file():
            continue  # its files are gone already: it names nothing that could still be read
        try:
            relative = (json.loads(manifest.read_text(encoding="utf-8")).get("training_data") or {}).get("path")
        except (OSError, ValueError, AttributeError) as exc:
            plan.unreadable.append(f"{record.name} v{record.version}: {exc}")
            continue
        if relative:
            named.add((model_dir / relative).resolve())
    young = time.time() - grace.total_seconds()
    data_dir = model_dir / DATA_DIR
    if data_dir.is_dir():
        for path in sorted(data_dir.iterdir()):
            if _mtime(path) >= young:
                continue
            if path.name.startswith("."):
                plan.leftovers.append(path)  # a temporary file of a training set being kept when its writer died
            elif path.suffix == ".npz" and not plan.unreadable and path.resolve() not in named:
                plan.data.append(path)
    names = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name != DATA_DIR) if model_dir.is_dir() else []
    for folder in names:  # a version saved aside whose registration died before moving it into place
        plan.leftovers += [p for p in sorted(folder.glob(".v*-*")) if p.is_dir() and _mtime(p) < young]
    return plan


def prune(plan: PrunePlan) -> int:
    """Remove what ``plan`` names; the bytes freed."""
    freed = 0
    for path in plan.paths:
        size = _size(path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        freed += size
        log.info("pruned %s (%d bytes)", path, size)
    return freed


def _inside(path: Path, model_dir: Path) -> bool:
    """An absolute ``artifact_uri`` (a model registered from elsewhere) is not this store's to delete."""
    return path.resolve().is_relative_to(model_dir.resolve())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()  # gone meanwhile, or unreadable: treated as new, so left alone


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
