"""Training a model and putting it in the registry: what ``coilguard train`` and ReTrain share.

The artifact is written and checksummed before the registry hears of it, and moved into its version's folder
once the row is committed: a crash can leave an orphan folder, or a candidate row whose folder never arrived
(``coilguard models`` shows it as missing), but never an active version without intact weights.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from ml.assessors.base import Assessor
from ml.assessors.manifest import ArtifactError, Manifest
from ml.assessors.registry import load_artifact
from ml.dataset import CoilDataset
from ml.durable import sync_dir, sync_file, sync_tree
from ml.imagesets import ImageSet
from workflows.ports import ModelRecord, ModelRegistry, VersionTaken

log = logging.getLogger(__name__)

DATA_DIR = "data"  # under MODEL_DIR: every training set a registered model was fitted on
REGISTER_TRIES = 5

# A model name becomes a folder under MODEL_DIR and a path segment of the API (/models/{name}); the
# pattern keeps it both (no separators, no "..", what the models.name column holds).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"


def check_model_name(name: str) -> str:
    """A new model's name (``coilguard train --name``)."""
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise ValueError(
            f"model name {name!r}: 1-128 characters of letters, digits, '.', '_' and '-', not starting with '.'"
        )
    return name


def check_name_free(registry: ModelRegistry, name: str) -> None:
    """Refuse a name that differs from a registered one by case alone: on a volume blind to case (an SMB share, as
    some ReadWriteMany storage classes are) the two would share one folder, and registering a version of the
    new name would replace the files of the same version of the old."""
    names = {r.name for r in registry.all()}
    clash = sorted(n for n in names if n != name and n.casefold() == name.casefold())
    if clash and name not in names:  # names an older release registered side by side keep their versions coming
        raise ValueError(f"model name {name!r} differs from the registered {clash[0]!r} only by case: use that one")


def check_folder_name(name: str) -> str:
    """What any name must be to become one folder under MODEL_DIR (names registered by older releases,
    which did not check them, included): nothing that climbs out of it or nests."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"model name {name!r} cannot be a folder under MODEL_DIR; register the model under another")
    return name


def training_data(spec: str, *, seed: int = 0) -> CoilDataset | ImageSet:
    """``sim:N`` (N simulated coils of the undrifted line, seeded), a path to a ``.npz`` dataset, or a folder
    of labelled surface images (one subfolder per class, optional same-name ``.png`` masks) for the image
    assessors."""
    if spec.startswith("sim:"):
        from ml.sim import LineConfig, LineSimulator

        try:
            n = int(spec.removeprefix("sim:"))
        except ValueError:
            raise ValueError(f"bad data spec {spec!r}: expected sim:N with N a number of coils") from None
        return LineSimulator(LineConfig(seed=seed, id_prefix=f"T{seed}")).dataset(n)
    path = Path(spec)
    if path.is_dir():
        from ml.imagesets.folder import load_folder

        return load_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset at {path} (use sim:N for simulated coils, or an image folder)")
    return CoilDataset.load(path)


def artifact_dir(model_dir: Path, name: str, version: int) -> tuple[Path, str]:
    """Where version ``version`` of ``name`` lives, and the URI recorded for it (relative to MODEL_DIR)."""
    uri = f"{check_folder_name(name)}/v{version}"
    return Path(model_dir) / uri, uri


def resolve_artifact(model_dir: Path, artifact_uri: str) -> Path:
    """``artifact_uri`` is relative to ``MODEL_DIR`` (portable across pods) or an absolute path/``file://``."""
    path = Path(artifact_uri.removeprefix("file://"))
    return path if path.is_absolute() else Path(model_dir) / path


def load_model(record: ModelRecord, model_dir: Path) -> Assessor:
    """A registered model, verified twice: weights against its manifest, manifest against the registry."""
    path = resolve_artifact(model_dir, record.artifact_uri)
    if not record.sha256:  # without it, a manifest rewritten to integrity version 1 could change the threshold
        raise ArtifactError(f"{record.name} v{record.version} has no checksum in the registry: register it again")
    try:  # the registry's checksum covers the old manifest format too
        assessor = load_artifact(path, allow_legacy=True, expected_sha256=record.sha256)
    except ArtifactError as exc:
        raise ArtifactError(f"{record.name} v{record.version}: {exc}") from None
    assessor.name, assessor.version = record.name, record.version
    return assessor


def keep_training_data(dataset: CoilDataset, model_dir: Path) -> str:
    """Store a training set once (content-addressed) and return its path relative to MODEL_DIR."""
    digest = dataset.content_digest()
    relative = f"{DATA_DIR}/{digest[:20]}.npz"
    path = Path(model_dir) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and _intact(model_dir, relative):
        try:  # in use again: `models prune` leaves a set of the last day alone while its row is being written
            os.utime(path)
            return relative
        except FileNotFoundError:
            pass  # pruned this very moment: written again
        except OSError as exc:  # another user's file (an operator's `train --register`, NFS root squashing)
            log.warning("kept training set %s reused but not dated anew (%s): `models prune` may take it", path, exc)
            return relative
    tmp = path.with_name(f".{path.stem}-{uuid.uuid4().hex[:12]}.npz")  # two processes may keep it at once
    try:
        dataset.save(tmp)
        sync_file(tmp)
        tmp.replace(path)
        sync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return relative


def _intact(model_dir: Path, relative: str) -> bool:
    """Whether a kept set reads back whole: one truncated by a crash would otherwise stay, named by the content
    it no longer holds, and fail every ReTrain that starts from it."""
    try:
        load_kept_data(model_dir, relative)
    except Exception as exc:  # truncated zip, bad array, changed content: whatever it is, it is written again
        log.warning("kept training set %s is unreadable (%s: %s); writing it again", relative, type(exc).__name__, exc)
        return False
    return True


def training_history(assessor: Assessor, model_dir: Path) -> CoilDataset | None:
    """The data ``assessor`` was trained on, when it was kept (see :func:`register`); None when it was not.

    A set the manifest names but that is gone (pruned, another volume mounted) is an error, not "no history":
    a challenger trained on the operators' coils alone forgets what the history taught, and once promoted it
    keeps only those, so every later ReTrain would have lost the history for good."""
    relative = assessor.training_data.get("path")
    if not relative:
        return None
    path = Path(model_dir) / relative
    if not path.is_file():
        raise ArtifactError(
            f"{assessor.describe()} was trained on {path}, which is missing: restore it from "
            "a copy of MODEL_DIR (the file's name is its content's digest) rather than retrain without the history"
        )
    return load_kept_data(model_dir, relative)


def load_kept_data(model_dir: Path, relative: str) -> CoilDataset:
    """A training set kept by :func:`keep_training_data`, refused when its content no longer matches its name."""
    path = Path(model_dir) / relative
    data = CoilDataset.load(path)
    if data.content_digest().startswith(path.stem):  # kept under its content's digest
        return data
    if data.summary()["sha256"].startswith(path.stem):  # kept by a release that named files by X and y alone
        log.warning("%s was kept by an earlier release: only its matrices and labels can be checked", path)
        return data
    raise ArtifactError(f"{path} was changed after it was kept: its content no longer matches its name")


def _folder_owner(directory: Path) -> str | None:
    """The model name the manifest in ``directory`` gives, or None where there is none to read."""
    try:
        return Manifest.read(directory).name
    except (ArtifactError, OSError):
        return None


def check_can_vote(assessor: Assessor) -> None:
    """Refuse a model that would abstain on every coil in service (and, alone, fail every one)."""
    if not assessor.can_vote:
        raise ValueError(
            f"{assessor.name} gives no coil a NOK probability: it was trained without a class of defect-free images "
            f"(classes {assessor.training_data.get('classes')}); add one (a folder named ok or good) and train again"
        )


def register(
    assessor: Assessor,
    registry: ModelRegistry,
    model_dir: Path,
    *,
    status: str = "candidate",
    parent_id: int | None = None,
    extra_metrics: dict[str, Any] | None = None,
    dataset: CoilDataset | None = None,
    replacing: int | None = None,
) -> ModelRecord:
    """Save ``assessor`` as the next version of its name and record it with ``status``.

    With ``dataset`` (what it was fitted on) the data is kept under ``MODEL_DIR/data`` and named in the
    manifest: the model can be reproduced, and ReTrain uses it as the history to add feedback to.
    ``replacing`` (with ``status="active"``): promoted only over that version, or over none with
    :data:`NO_ACTIVE_VERSION`; otherwise it stays a candidate and :class:`ChampionChanged` says why.
    """
    check_name_free(registry, assessor.name)
    check_can_vote(assessor)
    if dataset is not None:
        assessor.training_data = {**assessor.training_data, "path": keep_training_data(dataset, model_dir)}
    metrics = {**assessor.metrics, **(extra_metrics or {})}
    # Saved aside first and moved into its version's folder only once the row is ours: two registrants of one
    # name (the weekly ReTrain and an operator's `train --register`) may look up the same next version.
    for _ in range(REGISTER_TRIES):
        version = registry.next_version(assessor.name)
        directory, uri = artifact_dir(model_dir, assessor.name, version)
        if (owner := _folder_owner(directory)) not in (None, assessor.name):  # a case-blind volume: `CNN/v4` is
            raise ArtifactError(  # `cnn/v4`, a version of a name an older release registered beside this one
                f"{directory} holds the files of {owner} v{version} (the volume does not tell names apart by case): "
                f"register {assessor.name!r} under another name"
            )
        staging = directory.with_name(f".{directory.name}-{uuid.uuid4().hex[:12]}")
        assessor.version = version
        try:
            manifest = assessor.save(staging)
            sync_tree(staging)  # on disk before the row that points at it is committed
            record = registry.add(
                name=assessor.name,
                kind=assessor.key,
                version=version,
                artifact_uri=uri,
                sha256=manifest.weights_sha256,
                metrics=metrics,
                parent_id=parent_id,
            )
        except BaseException as exc:  # a full disk, the database away, SIGTERM: no half-saved folder stays
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, VersionTaken):
                continue
            raise
        if directory.exists():  # left by a crash of an older release between saving and registering
            shutil.rmtree(directory)
        staging.rename(directory)
        sync_dir(directory.parent)
        break
    else:
        raise RuntimeError(f"{assessor.name}: every version tried was registered by another process first")
    if status == "active":
        registry.promote(record.id, replacing=replacing)
    elif status != "candidate":
        registry.set_status(record.id, status)
    return registry.get(record.id)
