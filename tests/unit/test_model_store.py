"""``coilguard models prune``: MODEL_DIR freed of what no version in service needs, and nothing else."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from cli_runner import coilguard
from sqlalchemy import insert

from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.models import Model
from workflows.model_store import plan_prune, prune
from workflows.ports import ModelRecord

OLD = time.time() - 3 * 86400  # files older than the grace period


def _version(model_dir: Path, name: str, version: int, status: str, data: str | None, age: float = OLD) -> ModelRecord:
    """A version's folder with a manifest naming its training set, dated ``age``."""
    folder = model_dir / name / f"v{version}"
    folder.mkdir(parents=True)
    (folder / "weights.pt").write_bytes(b"w" * 1000)
    (folder / "manifest.json").write_text(json.dumps({"training_data": {"path": data} if data else {}}))
    for path in (folder, folder / "weights.pt", folder / "manifest.json"):
        os.utime(path, (age, age))
    return ModelRecord(version, name, "cnn", version, status, f"{name}/v{version}", "0" * 64)


def _file(path: Path, age: float = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"d" * 5000)
    os.utime(path, (age, age))
    return path


def _store(model_dir: Path) -> list[ModelRecord]:
    """cnn v1–v6: v1 failed, v2–v5 retired, v6 active; each retired one trained on its own set. A candidate and a
    set named by nobody; leftovers of dead registrations, old and new; a set written a moment ago."""
    records = [_version(model_dir, "cnn", 1, "failed", "data/a.npz")]
    records += [
        _version(model_dir, "cnn", v, "retired", f"data/{x}.npz") for v, x in zip(range(2, 6), "bcde", strict=True)
    ]
    records += [
        _version(model_dir, "cnn", 6, "active", "data/f.npz"),
        _version(model_dir, "yolo", 1, "candidate", "data/a.npz"),
    ]
    for name in "abcdefz":
        _file(model_dir / "data" / f"{name}.npz")
    _file(model_dir / "data" / "new.npz", age=time.time())  # a ReTrain registering now
    _file(model_dir / "data" / ".g-0123456789ab.npz")  # a kept set whose writer died
    (model_dir / "cnn" / ".v7-0123456789ab").mkdir()
    os.utime(model_dir / "cnn" / ".v7-0123456789ab", (OLD, OLD))
    (model_dir / "cnn" / ".v8-0123456789ab").mkdir()  # being saved now
    return records


def test_prune_keeps_what_serves_what_a_rollback_needs_and_anything_new(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    records = _store(model_dir)
    plan = plan_prune(records, model_dir, keep=3)
    assert [(r.name, r.version) for r, _ in plan.versions] == [("cnn", 1), ("cnn", 2)]  # beyond 3 retired; failed
    assert sorted(p.name for p in plan.data) == ["b.npz", "z.npz"]  # a.npz: the candidate's; c, d, e: kept versions'
    assert sorted(p.name for p in plan.leftovers) == [".g-0123456789ab.npz", ".v7-0123456789ab"]
    manifest = (model_dir / "cnn" / "v1" / "manifest.json").stat().st_size  # v2's is as long
    expected = 2 * (1000 + manifest) + 3 * 5000  # two version folders, two sets and a temporary file
    assert plan.size() == expected
    assert prune(plan) == expected
    assert not (model_dir / "cnn" / "v1").exists() and not (model_dir / "cnn" / "v2").exists()
    assert all((model_dir / "cnn" / f"v{v}").is_dir() for v in (3, 4, 5, 6)) and (model_dir / "yolo" / "v1").is_dir()
    assert sorted(p.name for p in (model_dir / "data").iterdir()) == [
        "a.npz",
        "c.npz",
        "d.npz",
        "e.npz",
        "f.npz",
        "new.npz",
    ]
    assert (model_dir / "cnn" / ".v8-0123456789ab").is_dir()
    assert not plan_prune(records, model_dir, keep=3).paths  # nothing left to do


def test_an_unreadable_manifest_keeps_every_training_set(tmp_path: Path) -> None:
    """What a kept version was trained on cannot be told: ReTrain would fail on it if its set were removed."""
    model_dir = tmp_path / "models"
    records = _store(model_dir)
    (model_dir / "cnn" / "v6" / "manifest.json").write_text("{not json")
    plan = plan_prune(records, model_dir, keep=3)
    assert not plan.data and len(plan.unreadable) == 1 and "cnn v6" in plan.unreadable[0]
    assert [(r.name, r.version) for r, _ in plan.versions] == [("cnn", 1), ("cnn", 2)]  # folders still go


def _registry(tmp_path: Path, records: list[ModelRecord]) -> str:
    """A SQLite registry holding ``records``; its URL."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            insert(Model),
            [dict(name=r.name, kind=r.kind, version=r.version, status=r.status, artifact_uri=r.artifact_uri,
                  sha256=r.sha256) for r in records],
        )  # fmt: skip
    engine.dispose()
    return url


def test_the_command_lists_then_prunes(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    url = _registry(tmp_path, _store(model_dir))
    env = {"COILGUARD_DATABASE_URL": url, "COILGUARD_MODEL_DIR": str(model_dir)}
    dry = coilguard("models", "prune", "--keep", "3", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "cnn v1 (failed)" in dry.stdout and "cnn v2 (retired)" in dry.stdout and "nothing removed" in dry.stdout
    assert (model_dir / "cnn" / "v1").is_dir()
    done = coilguard("models", "prune", "--keep", "3", env=env)
    assert done.returncode == 0 and "freed" in done.stdout, done.stderr
    assert not (model_dir / "cnn" / "v1").exists() and (model_dir / "cnn" / "v3").is_dir()


def test_prune_touches_no_folder_it_did_not_make_for_that_version(tmp_path: Path) -> None:
    """A row without an artifact (NULL: the store's root), one pointing at a name's folder, a rollback done by
    SQL whose new row shares an old version's folder, a version made a moment ago: none of their folders go."""
    from dataclasses import replace

    model_dir = tmp_path / "models"
    records = _store(model_dir)
    failed = [
        replace(records[0], id=20, version=20, artifact_uri=""),
        replace(records[0], id=21, version=21, artifact_uri="cnn"),
    ]
    shared = replace(records[5], id=22, version=9, artifact_uri="cnn/v2")  # active, on v2's folder
    fresh = _version(model_dir, "cnn", 7, "failed", None, age=time.time())
    plan = plan_prune([*records, *failed, shared, fresh], model_dir, keep=3)
    assert [(r.name, r.version) for r, _ in plan.versions] == [("cnn", 1)]  # not the root, cnn/, v2 or v7
    assert "b.npz" not in {p.name for p in plan.data}  # v2's set: the active v9 was trained on it


def test_the_retired_versions_kept_are_those_that_served_last(tmp_path: Path) -> None:
    """After a rollback from v4 to v2, v2 and v4 served last; v3, a candidate retired without serving, goes first."""
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    model_dir = tmp_path / "models"
    now = datetime.now(UTC)
    served = {1: now - timedelta(days=30), 2: now - timedelta(days=1), 4: now - timedelta(days=5)}
    records = [
        replace(_version(model_dir, "cnn", v, "retired", None), promoted_at=served.get(v)) for v in (1, 2, 3, 4)
    ] + [_version(model_dir, "cnn", 5, "active", None)]
    plan = plan_prune(records, model_dir, keep=2)
    assert sorted(r.version for r, _ in plan.versions) == [1, 3]


def test_a_missing_manifest_of_a_version_in_service_keeps_every_training_set(tmp_path: Path) -> None:
    """A registration between writing its row and moving its folder in: the set it names is not known yet, and
    may be an old one it reuses."""
    model_dir = tmp_path / "models"
    records = _store(model_dir)
    (model_dir / "yolo" / "v1" / "manifest.json").unlink()
    plan = plan_prune(records, model_dir, keep=3)
    assert not plan.data and "yolo v1: no manifest" in plan.unreadable[0]


def test_a_training_set_kept_again_is_dated_anew(tmp_path: Path) -> None:
    """`train --register` on data kept long ago reuses the file: it must look new to a prune running meanwhile."""
    from helpers import stripe_coils

    from workflows.training import keep_training_data

    data = stripe_coils(20, 0.2)
    relative = keep_training_data(data, tmp_path)
    os.utime(tmp_path / relative, (OLD, OLD))
    plan = plan_prune([], tmp_path)
    assert [p.name for p in plan.data] == [Path(relative).name]  # named by no version: planned for removal
    assert keep_training_data(data, tmp_path) == relative  # reused meanwhile by a registration
    assert (tmp_path / relative).stat().st_mtime > time.time() - 60
    assert prune(plan) == 0 and (tmp_path / relative).is_file()  # the plan is not carried out on it


@pytest.mark.parametrize("keep", ["2", "off"])
def test_a_retrain_pass_prunes_unless_model_keep_is_off(tmp_path: Path, keep: str) -> None:
    """The store would otherwise grow by a version folder and a training set at every promotion, until the volume
    is full and a promotion fails; the pass below retrains nothing (no model is due), and prunes all the same."""
    from services.config import load_settings
    from services.jobs import run_retrain

    model_dir = tmp_path / "models"
    url = _registry(tmp_path, _store(model_dir))
    settings = load_settings(database_url=url, model_dir=model_dir, model_keep=keep, mqtt_url="mqtt://127.0.0.1:1")
    assert run_retrain(settings) == []
    retired = sorted(p.name for p in (model_dir / "cnn").iterdir() if p.name.startswith("v"))
    if keep == "off":
        assert retired == ["v1", "v2", "v3", "v4", "v5", "v6"] and (model_dir / "data" / "z.npz").is_file()
    else:  # failed v1 and the retired v2, v3 beyond the two kept; the set no kept version names
        assert retired == ["v4", "v5", "v6"] and not (model_dir / "data" / "z.npz").exists()


def test_a_prune_that_finds_its_paths_removed_by_another_goes_on(tmp_path: Path, monkeypatch) -> None:
    """The scheduler's prune after a ReTrain and one by hand at the same time: a file the other removed between
    this one listing a folder and unlinking it is not an error (it was a traceback, or "pruning failed" after a
    ReTrain)."""
    model_dir = tmp_path / "models"
    plan = plan_prune(_store(model_dir), model_dir, keep=3)
    unlink = os.unlink

    def the_other_prune_came_first(path, *args, **kwargs) -> None:
        unlink(path, *args, **kwargs)
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(os, "unlink", the_other_prune_came_first)
    prune(plan)
    monkeypatch.undo()
    assert not (model_dir / "cnn" / "v1").exists() and not (model_dir / "cnn" / "v2").exists()
