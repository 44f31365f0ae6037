"""Pruning ``MODEL_DIR``: what a plant running for years would otherwise fill its volume with.

Every promoted ReTrain challenger keeps a new version folder and a new training set (its history plus the
operators' coils: tens of MB, more each week), and nothing removed them. The registry rows stay: the history of
what served when is worth more than the bytes; only files go.

Kept: every version that is neither retired nor failed (active, candidate); per name the ``keep`` retired ones
that served last (what a rollback would put back); the training sets those versions' manifests name; and
anything written in the last ``grace`` (a ReTrain or ``train --register`` registering now writes its training
set and a staging folder before its row exists). Removed: the folders of the other retired and failed versions,
training sets no kept version names, and the staging folders and temporary files a killed registration left
behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ml.assessors.manifest import MANIFEST_FILE
from workflows.ports import ModelRecord
from workflows.training import DATA_DIR, artifact_dir, resolve_artifact

log = logging.getLogger(__name__)

KEEP_RETIRED = 3  # retired versions kept per name: rollback targets
GRACE = timedelta(days=1)  # anything newer may belong to a registration under way


@dataclass
class PrunePlan:
    versions: list[tuple[ModelRecord, Path]] = field(default_factory=list)  # folders of versions to remove
    data: list[Path] = field(default_factory=list)  # training sets no kept version names
    leftovers: list[Path] = field(default_factory=list)  # staging folders and temporary files of dead registrations
    unreadable: list[str] = field(default_factory=list)  # kept versions whose manifest could not be read
    young_after: float = 0.0  # a path changed since this time (seconds since the epoch) is left alone

    @property
    def paths(self) -> list[Path]:
        return [path for _, path in self.versions] + self.data + self.leftovers

    def size(self) -> int:
        return sum(_size(path) for path in self.paths)


def plan_prune(
    records: list[ModelRecord], model_dir: Path, keep: int = KEEP_RETIRED, grace: timedelta = GRACE
) -> PrunePlan:
    """What :func:`prune` would remove, read from the registry's ``records`` (every version) and the disk.

    A version's folder goes only where it is the one this store made for it (``<name>/v<version>``, a real folder)
    and no kept version's row points into it (a rollback once done by SQL may have a new row share an old folder).
    Training sets are left alone when a kept version's manifest cannot be read, or an active or candidate one's is
    not there yet (a registration between its row and moving its folder in): what it names is unknown."""
    model_dir = Path(model_dir)
    young = time.time() - grace.total_seconds()
    plan = PrunePlan(young_after=young)
    kept, dropped = _split(records, keep)
    kept_folders = [resolve_artifact(model_dir, r.artifact_uri or "").resolve() for r in kept]
    for record in dropped:
        try:
            folder, _ = artifact_dir(model_dir, record.name, record.version)
        except ValueError:  # a name no folder of this store could have: not ours
            continue
        if (
            resolve_artifact(model_dir, record.artifact_uri or "").resolve() == folder.resolve()
            and folder.is_dir()
            and not folder.is_symlink()
            and not any(k == folder.resolve() or k.is_relative_to(folder.resolve()) for k in kept_folders)
            and _mtime(folder) < young
        ):
            plan.versions.append((record, folder))
    named: set[Path] = set()
    for record in kept:
        manifest = resolve_artifact(model_dir, record.artifact_uri or "") / MANIFEST_FILE
        if not manifest.is_file():
            if record.status in ("active", "candidate"):
                plan.unreadable.append(f"{record.name} v{record.version}: no manifest at {manifest} (yet)")
            continue  # a kept retired version without files names nothing that could still be read
        try:
            relative = (json.loads(manifest.read_text(encoding="utf-8")).get("training_data") or {}).get("path")
        except (OSError, ValueError, AttributeError) as exc:
            plan.unreadable.append(f"{record.name} v{record.version}: {exc}")
            continue
        if relative:
            named.add((model_dir / relative).resolve())
    data_dir = model_dir / DATA_DIR
    if data_dir.is_dir():
        for path in sorted(data_dir.iterdir()):
            if _mtime(path) >= young or not path.is_file():
                continue
            if path.name.startswith("."):
                plan.leftovers.append(path)  # a temporary file of a training set being kept when its writer died
            elif path.suffix == ".npz" and not plan.unreadable and path.resolve() not in named:
                plan.data.append(path)
    names = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name != DATA_DIR) if model_dir.is_dir() else []
    for folder in names:  # a version saved aside whose registration died before moving it into place
        plan.leftovers += [
            p for p in sorted(folder.glob(".v*-*")) if p.is_dir() and not p.is_symlink() and _mtime(p) < young
        ]
    return plan


def _split(records: list[ModelRecord], keep: int) -> tuple[list[ModelRecord], list[ModelRecord]]:
    """(kept, dropped): dropped are the failed versions and, per name, the retired ones beyond the ``keep`` that
    served last (a rollback's targets; retired candidates that never served go first). Any other status is kept."""
    kept = [r for r in records if r.status not in ("retired", "failed")]
    dropped = [r for r in records if r.status == "failed"]
    retired: dict[str, list[ModelRecord]] = {}
    for record in records:
        if record.status == "retired":
            retired.setdefault(record.name, []).append(record)
    for versions in retired.values():
        versions.sort(key=lambda r: (r.promoted_at is not None, r.promoted_at or datetime.min, r.version), reverse=True)
        kept += versions[:keep]
        dropped += versions[keep:]
    return kept, dropped


def prune(plan: PrunePlan) -> int:
    """Remove what ``plan`` names, but for what changed since it was made (a training set a registration reuses
    now is dated anew); the bytes freed."""
    freed = 0
    for path in plan.paths:
        if _mtime(path) >= plan.young_after:
            log.info("not pruned: %s changed since the plan was made", path)
            continue
        size = _size(path)
        if path.is_dir():
            shutil.rmtree(path, onerror=_gone_is_fine)  # onexc from Python 3.12; onerror still works there
        else:
            path.unlink(missing_ok=True)
        freed += size
        log.info("pruned %s (%d bytes)", path, size)
    return freed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()  # gone meanwhile, or unreadable: treated as new, so left alone


def _gone_is_fine(function: Any, path: str, excinfo: Any) -> None:
    """``rmtree``'s error handler: a path another prune (the scheduler's, the CronJob's, one by hand) removed
    first is what this one wanted too."""
    if not isinstance(excinfo[1], FileNotFoundError):
        raise excinfo[1]


def _size(path: Path) -> int:
    """The bytes under ``path``, as far as they are still there (another prune may be removing them now)."""
    total = 0
    for file in [path] if not path.is_dir() else path.rglob("*"):
        try:
            total += file.stat().st_size if file.is_file() else 0
        except FileNotFoundError:
            continue
    return total
