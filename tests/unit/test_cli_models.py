"""``coilguard train``, ``models`` and ``evaluate`` as an engineer runs them: coil data or an image folder
in, a saved or registered model out, a progress line that every kind of assessor can fill, and an
evaluation report with its table and plots.

The assessors report different figures per epoch (NOK-F1, IoU, the defect type's accuracy, or losses
alone); the progress bar and the closing summary must show what each has and never trip over what it
lacks. These run the real command in a fresh process on SQLite; no broker is involved.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runner import coilguard
from helpers import stripe_coils, synthetic_images, synthetic_tiles, write_image_folder
from sqlalchemy import select

from ml.assessors.base import AssessBatch, Assessor
from ml.assessors.manifest import ArtifactError
from ml.assessors.registry import create, load_artifact
from services.db.engine import make_engine
from services.db.migrate import upgrade
from services.db.models import Model
from services.db.repositories import SqlModelRegistry
from services.progress import epoch_status, validation_summary
from workflows import versions
from workflows.model_store import plan_prune, prune
from workflows.ports import ModelRecord
from workflows.training import load_model, register

# Tiny settings: the command's plumbing is under test, not the models.
TINY: dict[str, list[str]] = {
    "ssim_ae": ["epochs=2", "width=4", "batch_size=8", "latent_dim=16"],
    "contrastive_seg": ["epochs=2", "width=4", "depth=2", "image_size=32", "batch_size=4", "proj_dim=8"],
    "rmcsam": ["epochs=2", "imgsz=32", "batch_size=16"],
}


def _sets(key: str) -> list[str]:
    return [arg for setting in TINY[key] for arg in ("--set", setting)]


def test_epoch_status_shows_what_each_assessor_reports() -> None:
    coil = {"epoch": 3, "epochs": 9, "train_loss": 0.41, "val_loss": 0.52, "val_f1": 0.8}
    segmenter = {"epoch": 1, "epochs": 9, "train_loss": 0.9, "val_loss": 0.7, "val_f1": None, "val_iou": 0.31}
    autoencoder = {"epoch": 1, "epochs": 9, "train_loss": 0.2, "val_loss": 0.19, "val_f1": None}
    assert epoch_status(coil) == "loss 0.410  val 0.520  val F1 0.80"
    assert epoch_status(segmenter) == "loss 0.900  val 0.700  val IoU 0.31"
    assert epoch_status(autoencoder) == "loss 0.200  val 0.190"
    assert epoch_status({"epoch": 1, "epochs": 1, "train_loss": 0.3, "val_loss": None}) == "loss 0.300"


def test_validation_summary_names_the_figures_a_fit_has() -> None:
    assert validation_summary({"f1_nok": 0.9, "roc_auc": None, "n": 40}) == "validation NOK-F1 0.900"
    assert validation_summary({"iou": 0.5, "f1_nok": 0.75}) == "validation NOK-F1 0.750, IoU 0.500"
    assert validation_summary({}) == "no validation figures"


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(TINY))
def test_train_an_image_assessor_on_a_folder(key: str, tmp_path: Path) -> None:
    images = synthetic_tiles() if key != "rmcsam" else synthetic_images(per_class=10)
    folder = write_image_folder(images, tmp_path / "images")
    out = tmp_path / "model"
    run = coilguard("train", "--assessor", key, "--data", str(folder), "--seed", "3", *_sets(key), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert f"images of {len(images.classes)} classes" in run.stdout and "done in" in run.stdout
    assert "validation " in run.stdout and f"saved to {out}" in run.stdout
    assessor = load_artifact(out)
    assert assessor.key == key and assessor.settings.seed == 3
    p, _ = assessor.predict(AssessBatch(np.full((2, 264, 18), 140.0, np.float32), [[images.images[-1]], []]))
    assert np.isfinite(p[0]) and np.isnan(p[1])  # votes on the coil with an image, abstains on the other


@pytest.mark.slow
def test_an_image_assessor_trained_on_coils_comes_with_a_note(tmp_path: Path) -> None:
    out = tmp_path / "model"
    run = coilguard("train", "--assessor", "ssim_ae", "--data", "sim:80", *_sets("ssim_ae"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "note: ssim_ae learns here from coil matrices rendered as images" in run.stderr
    assert "80 coils" in run.stdout and load_artifact(out).training_data["source"] == "coils"


@pytest.mark.slow
def test_an_image_folder_is_refused_for_a_matrix_assessor(tmp_path: Path) -> None:
    folder = write_image_folder(synthetic_tiles(4, 2), tmp_path / "images")
    run = coilguard("train", "--assessor", "cnn", "--data", str(folder), "--out", str(tmp_path / "m"))
    assert run.returncode != 0 and "cnn assesses coil matrices, not images" in run.stderr


@pytest.mark.slow
def test_train_registers_a_coil_model_that_models_then_lists(tmp_path: Path) -> None:
    env = {"COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cg.db'}", "COILGUARD_MODEL_DIR": str(tmp_path / "m")}
    assert coilguard("db", "upgrade", env=env).returncode == 0
    run = coilguard("train", "--assessor", "cnn", "--data", "sim:300", "--set", "epochs=1", "--register", env=env)
    assert run.returncode == 0, run.stderr
    assert "300 coils" in run.stdout and "validation NOK-F1" in run.stdout
    assert "registered cnn v1 (active)" in run.stdout
    again = ("train", "--assessor", "cnn", "--data", "sim:300", "--set", "epochs=1", "--register", "--unless-serving")
    kept = coilguard(*again, env=env)  # compose's bootstrap at the next `up`: v1 (or a retrained v2) serves
    assert kept.returncode == 0 and "cnn v1 serves already; nothing trained" in kept.stdout, kept.stderr
    assert "training" not in kept.stdout and not (tmp_path / "m" / "cnn" / "v2").exists()
    alone = coilguard(*again[:-2], "--unless-serving", env=env)
    assert alone.returncode == 2 and "--unless-serving goes with --register" in alone.stderr
    listed = coilguard("models", env={**env, "COLUMNS": "200"})  # a wide table, nothing cut
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if "cnn/v1" in line]
    cells = [cell.strip() for cell in re.split(r"[│|]", row) if cell.strip()]  # rich's or plain borders
    assert cells[:4] == ["cnn", "1", "cnn", "active"] and "missing" not in row and not listed.stderr
    shutil.rmtree(tmp_path / "m" / "cnn" / "v1")  # as a registration killed before moving its files in leaves it
    listed = coilguard("models", env={**env, "COLUMNS": "200"})
    [row] = [line for line in listed.stdout.splitlines() if "cnn/v1" in line]
    assert "cnn/v1 (missing)" in row and "1 version(s) have no files under MODEL_DIR" in listed.stderr


@pytest.mark.slow
def test_models_promote_and_retire_refuse_what_would_break_serving(tmp_path: Path) -> None:
    """Without a broker (port 9 refuses): the change stands, and workers find it by polling the registry."""
    model_dir = tmp_path / "m"
    env = {
        "COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cg.db'}",
        "COILGUARD_MODEL_DIR": str(model_dir),
        "COILGUARD_MQTT_URL": "mqtt://127.0.0.1:9",
    }
    assert coilguard("db", "upgrade", env=env).returncode == 0
    trained = coilguard("train", "--assessor", "cnn", "--data", "sim:200", "--set", "epochs=1", "--register", env=env)
    assert trained.returncode == 0, trained.stderr
    registry = SqlModelRegistry(make_engine(env["COILGUARD_DATABASE_URL"]))
    for _ in range(2):  # v2 and v3: candidates, as a ReTrain challenger or `train --register` of a rival would be
        register(load_artifact(model_dir / "cnn" / "v1"), registry, model_dir)

    def statuses() -> list[str]:
        return [r.status for r in registry.all(["cnn"])]

    def models(*args: str) -> subprocess.CompletedProcess:
        return coilguard("models", *args, env={**env, "COLUMNS": "200"})  # a wide table, nothing cut

    for args, why in [
        (("promote", "cnn", "1"), "cnn v1 is already active"),
        (("promote", "cnn", "7"), "no version 7 of a model named 'cnn' (registered: v1 (active), v2 (candidate), v3"),
        (("retire", "rnn", "1"), "no version 1 of a model named 'rnn' (registered: none)"),
    ]:
        refused = models(*args)
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
    shutil.rmtree(model_dir / "cnn" / "v3")  # a registration killed before its files were moved in
    refused = models("promote", "cnn", "3")
    assert refused.returncode == 1 and "cnn v3 cannot be put in service" in refused.stderr, refused.stderr
    assert statuses() == ["active", "candidate", "candidate"]

    rolled = models("retire", "cnn", "3")
    assert rolled.returncode == 0 and "retired cnn v3" in rolled.stdout and not rolled.stderr
    promoted = models("promote", "cnn", "2")
    assert promoted.returncode == 0, promoted.stderr
    assert "promoted cnn v2, retired v1" in promoted.stdout and "could not announce" in promoted.stderr
    assert statuses() == ["retired", "active", "retired"]
    assert models("retire", "cnn", "3").returncode == 1  # already retired
    kept = models("retire", "cnn", "2")  # the workers could not stop serving it: promote a successor instead
    assert kept.returncode == 1 and "the only active version of any model" in kept.stderr, kept.stderr
    assert statuses() == ["retired", "active", "retired"]
    last = models("retire", "cnn", "2", "--force")
    assert last.returncode == 0 and "no version of any model is active now" in last.stderr
    assert statuses() == ["retired", "retired", "retired"]
    listed = models("--all")
    assert listed.returncode == 0 and "cnn/v3 (missing)" in listed.stdout and "no files" not in listed.stderr


def test_a_promotion_by_hand_does_not_retire_a_version_it_never_saw(tmp_path: Path, monkeypatch) -> None:
    """Checking the artifact takes a while; a ReTrain that promotes its challenger meanwhile must not have that
    version retired by an operator who decided on the registry as it was before."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    engine = make_engine(url)
    registry = SqlModelRegistry(engine)
    cnn = create("cnn", {"epochs": 1, "batch_size": 32})
    cnn.fit(stripe_coils(60), device="cpu")
    first, rollback, challenger = (register(cnn, registry, tmp_path) for _ in range(3))
    registry.promote(first.id)

    load = versions.load_model

    def slow_check(record: ModelRecord, model_dir: Path) -> Assessor:  # ReTrain promotes while the check runs
        registry.promote(challenger.id, replacing=first.id)
        return load(record, model_dir)

    monkeypatch.setattr(versions, "load_model", slow_check)
    with pytest.raises(versions.VersionChangeRefused, match="cnn v1 was to be replaced, but v3 is active now"):
        versions.promote_version(registry, tmp_path, "cnn", rollback.version)
    assert [(r.version, r.status) for r in registry.all(["cnn"])] == [(1, "retired"), (2, "candidate"), (3, "active")]
    monkeypatch.undo()
    change = versions.promote_version(registry, tmp_path, "cnn", first.version)  # a rollback
    assert (change.promoted, change.retired, change.name_active) == (1, 3, True)
    with engine.connect() as conn:  # back in service: no longer shown as retired at some time
        row = conn.execute(select(Model.status, Model.retired_at).where(Model.id == first.id)).one()
    assert tuple(row) == ("active", None)


def test_a_bootstrap_that_finds_a_version_in_service_after_training_leaves_it_serving(
    tmp_path: Path, monkeypatch
) -> None:
    """Two `train --register --unless-serving` (compose's bootstrap, started twice) both find no cnn serving and
    train; the second to finish must not retire the first one's version, which serves by then."""
    from click.testing import CliRunner

    from services.cli import cli
    from services.cli import models as models_cli

    env = {"COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cg.db'}", "COILGUARD_MODEL_DIR": str(tmp_path)}
    upgrade(env["COILGUARD_DATABASE_URL"])
    registry = SqlModelRegistry(make_engine(env["COILGUARD_DATABASE_URL"]))
    serving = models_cli._serving_version
    looks: list[int | None] = []

    def the_other_bootstrap_finishes_first(database_url: str, name: str) -> int | None:
        if not looks:  # the look before training: nothing serves yet, and the other registers meanwhile
            cnn = create("cnn", {"epochs": 1, "batch_size": 32})
            cnn.fit(stripe_coils(60), device="cpu")
            register(cnn, registry, tmp_path, status="active")
            looks.append(None)
            return None
        looks.append(serving(database_url, name))
        return looks[-1]

    monkeypatch.setattr(models_cli, "_serving_version", the_other_bootstrap_finishes_first)
    args = ["train", "--assessor", "cnn", "--data", "sim:200", "--set", "epochs=1", "--register", "--unless-serving"]
    run = CliRunner().invoke(cli, args, env=env)
    assert run.exit_code == 0, run.output
    assert "cnn v1 went into service while this one trained; v2 stays a candidate" in run.output
    assert [(r.version, r.status) for r in registry.all(["cnn"])] == [(1, "active"), (2, "candidate")]


def test_a_name_that_differs_from_a_registered_one_by_case_alone_is_refused_before_training(tmp_path: Path) -> None:
    """On a volume blind to case `CNN/v1` is `cnn/v1`: registering it would replace the serving version's files."""
    env = {"COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cg.db'}", "COILGUARD_MODEL_DIR": str(tmp_path)}
    upgrade(env["COILGUARD_DATABASE_URL"])
    registry = SqlModelRegistry(make_engine(env["COILGUARD_DATABASE_URL"]))
    cnn = create("cnn", {"epochs": 1, "batch_size": 32})
    cnn.fit(stripe_coils(60), device="cpu")
    register(cnn, registry, tmp_path, status="active")
    run = coilguard("train", "--assessor", "cnn", "--name", "CNN", "--data", "sim:200", "--register", env=env)
    assert run.returncode == 2 and "'CNN' differs from the registered 'cnn' only by case" in run.stderr, run.stderr
    assert "training" not in run.stdout
    cnn.name = "Cnn"
    with pytest.raises(ValueError, match="'Cnn' differs from the registered 'cnn' only by case"):
        register(cnn, registry, tmp_path, status="active")
    assert [(r.name, r.version, r.status) for r in registry.all()] == [("cnn", 1, "active")]
    # two such names an older release registered side by side: both go on getting versions (ReTrain's included)
    registry.add(name="CNN", kind="cnn", version=1, artifact_uri="CNN/v1", sha256="0" * 64, status="retired")
    cnn.name = "CNN"
    assert register(cnn, registry, tmp_path).version == 2
    # ... but where the volume is blind to case, `CNN/v3` is `cnn/v3`: that folder is not taken over (as this
    # file system tells case apart, the other name's folder is copied there to stand for it)
    cnn.name = "cnn"
    register(cnn, registry, tmp_path)
    register(cnn, registry, tmp_path)
    shutil.copytree(tmp_path / "cnn" / "v3", tmp_path / "CNN" / "v3")
    cnn.name = "CNN"
    with pytest.raises(ArtifactError, match=r"holds the files of cnn v3 \(the volume does not tell names apart"):
        register(cnn, registry, tmp_path)
    assert load_model(registry.all(["cnn"])[2], tmp_path).version == 3


def test_a_rollback_while_a_prune_is_under_way_keeps_the_files_it_puts_back_in_service(tmp_path: Path) -> None:
    """The prune planned to remove v1 (retired, beyond MODEL_KEEP) and its training set; an operator rolled back
    to v1 before it deleted them. Serving v1 needs its folder, and its next ReTrain the set."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    registry = SqlModelRegistry(make_engine(url))
    cnn = create("cnn", {"epochs": 1, "batch_size": 32})
    cnn.fit(stripe_coils(60), device="cpu")
    first = register(cnn, registry, tmp_path, status="active", dataset=stripe_coils(60, seed=1))
    register(cnn, registry, tmp_path, status="active", dataset=stripe_coils(60, seed=2))
    old = time.time() - 3 * 86400
    kept_set = tmp_path / load_artifact(tmp_path / first.artifact_uri).training_data["path"]
    for path in (tmp_path / first.artifact_uri, kept_set):
        os.utime(path, (old, old))
    plan = plan_prune(registry.all(), tmp_path, keep=0)
    assert (tmp_path / first.artifact_uri) in [folder for _, folder in plan.versions] and kept_set in plan.data
    change = versions.promote_version(registry, tmp_path, "cnn", first.version)  # between plan and deletion
    prune(plan)
    assert load_model(registry.get(first.id), tmp_path).version == first.version and kept_set.is_file()
    assert change.warnings == ()
    kept_set.unlink()  # a prune before this release, or another volume mounted: it can serve, but not retrain
    second = versions.promote_version(registry, tmp_path, "cnn", first.version + 1)
    again = versions.promote_version(registry, tmp_path, "cnn", first.version)
    assert second.warnings == () and len(again.warnings) == 1
    assert f"its training set {kept_set} is gone" in again.warnings[0] and registry.get(first.id).status == "active"


def test_a_version_retired_while_it_was_promoted_is_refused_not_left_without_a_successor(tmp_path: Path) -> None:
    """`models retire cnn 2` saw v2 as a candidate; a promotion made it the active version before the retire
    wrote. Retiring it then would leave cnn with no active version, past the --force guard and with no event."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    registry = SqlModelRegistry(make_engine(url))
    cnn = create("cnn", {"epochs": 1, "batch_size": 32})
    cnn.fit(stripe_coils(60), device="cpu")
    register(cnn, registry, tmp_path, status="active")
    second = register(cnn, registry, tmp_path)
    seen = registry.all(["cnn"])  # what the retire decided on

    class Stale(SqlModelRegistry):
        def all(self, names=None):
            return seen

    registry.promote(second.id)  # meanwhile
    with pytest.raises(versions.VersionChangeRefused, match=r"cnn v2 changed while this was decided \(it was candid"):
        versions.retire_version(Stale(registry.engine), "cnn", second.version)
    assert registry.get(second.id).status == "active"


def test_a_version_this_release_cannot_build_is_refused_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    """Checksums fine, but the network in the file no longer fits the code (torch's size mismatch): the promotion
    is refused with the reason, as a tampered file is, and nothing changes (it was a traceback)."""
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    registry = SqlModelRegistry(make_engine(url))
    cnn = create("cnn", {"epochs": 1, "batch_size": 32})
    cnn.fit(stripe_coils(60), device="cpu")
    serving, other = (register(cnn, registry, tmp_path) for _ in range(2))
    registry.promote(serving.id)

    def mismatch(record: ModelRecord, model_dir: Path) -> None:
        raise RuntimeError("Error(s) in loading state_dict for CoilCNN: size mismatch for head.weight")

    monkeypatch.setattr(versions, "load_model", mismatch)
    with pytest.raises(versions.VersionChangeRefused, match="cannot be put in service by this release: RuntimeError"):
        versions.promote_version(registry, tmp_path, "cnn", other.version)
    assert [(r.version, r.status) for r in registry.all(["cnn"])] == [(1, "active"), (2, "candidate")]


@pytest.mark.slow
def test_evaluate_writes_the_table_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ("--data", "sim:300", "--folds", "2", "--repeats", "1", "--set", "cnn.epochs=1", "--out", str(out))
    run = coilguard("evaluate", "--assessors", "cnn", *args)
    assert run.returncode == 0, run.stderr
    table = (out / "report.md").read_text()
    assert "| cnn |" in table and "| ensemble |" in table and f"report: {out / 'report.md'}" in run.stdout
    for plot in ("confusion_matrices.png", "roc_gold.png", "cv_f1.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    refused = coilguard("evaluate", "--assessors", "cnn,nosuch", *args)
    assert refused.returncode != 0 and "not installed: nosuch" in refused.stderr
    # --quick fills only what is not given: it turned `--repeats 0` into a cross-validation and sim:N into sim:2000
    quick = ("--quick", "--repeats", "0", "--data", "sim:300", "--set", "cnn.epochs=1", "--out", str(tmp_path / "q"))
    run = coilguard("evaluate", "--assessors", "cnn", *quick)
    assert run.returncode == 0, run.stderr
    assert "on 300 coils" in run.stdout and "2×0 CV" in run.stdout


@pytest.mark.slow
def test_a_model_name_that_is_not_a_plain_folder_name_is_refused_before_training(tmp_path: Path) -> None:
    keep = tmp_path / "v1" / "precious.txt"  # what MODEL_DIR/../v1 would have deleted
    keep.parent.mkdir()
    keep.write_text("x")
    env = {"COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cg.db'}", "COILGUARD_MODEL_DIR": str(tmp_path / "m")}
    for name in ("..", "a/b", ".hidden", "x" * 129):
        run = coilguard("train", "--assessor", "cnn", "--data", "sim:50", "--name", name, "--register", env=env)
        assert run.returncode == 2 and "--name" in run.stderr and "training" not in run.stdout, (name, run.stderr)
    assert keep.read_text() == "x"


@pytest.mark.slow
def test_commands_on_a_database_never_migrated_say_to_upgrade_before_any_work(tmp_path: Path) -> None:
    env = {"COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}", "COILGUARD_MODEL_DIR": str(tmp_path / "m")}
    for args in (
        ("train", "--assessor", "cnn", "--data", "sim:50", "--register"),
        ("models",),
        ("feedback", "C-1", "OK", "--operator", "anna"),
        ("score",),
        ("retrain",),
    ):
        run = coilguard(*args, env=env)
        assert run.returncode == 1, (args, run.stderr)
        assert "schema revision none" in run.stderr and "run `coilguard db upgrade` first" in run.stderr, args
        assert "Traceback" not in run.stderr and "training" not in run.stdout, args
    assert not (tmp_path / "m").exists()  # nothing trained, nothing kept


@pytest.mark.slow
def test_train_without_out_or_register_keeps_the_model_and_its_manifest_names_the_data(tmp_path: Path) -> None:
    """`train` without --out or --register trained (an hour, with real settings), said "done" and threw the model
    away; and a saved manifest gave the data's counts and digest but not which data (`sim:N` and its seed, or the
    file) made it."""
    env = {"COILGUARD_MODEL_DIR": str(tmp_path / "m")}
    run = coilguard("train", "--assessor", "cnn", "--data", "sim:200", "--seed", "4", "--set", "epochs=1", env=env)
    assert run.returncode == 0, run.stderr
    [saved] = (tmp_path / "m" / "unregistered").iterdir()
    assert saved.name.startswith("cnn-") and f"saved to {saved}" in run.stdout
    model = load_artifact(saved)
    assert model.training_data["spec"] == {"data": "sim:200", "seed": 4} and model.settings.seed == 4
    data = tmp_path / "coils.npz"
    assert coilguard("dataset", "--coils", "120", "--out", str(data)).returncode == 0
    out = tmp_path / "from-file"
    run = coilguard("train", "--assessor", "cnn", "--data", str(data), "--set", "epochs=1", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert load_artifact(out).training_data["spec"] == {"data": str(data.resolve())}


@pytest.mark.slow
def test_a_classifier_of_defect_types_alone_is_kept_but_not_registered(tmp_path: Path) -> None:
    """It would abstain on every coil in service: the command says why, keeps the training, and exits 1."""
    folder = write_image_folder(synthetic_images(per_class=4, classes=("scratch", "spot")), tmp_path / "images")
    env = {"COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cg.db'}", "COILGUARD_MODEL_DIR": str(tmp_path / "m")}
    assert coilguard("db", "upgrade", env=env).returncode == 0
    run = coilguard("train", "--assessor", "rmcsam", "--data", str(folder), *_sets("rmcsam"), "--register", env=env)
    assert run.returncode == 1 and "not registered: rmcsam gives no coil a NOK probability" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(list((tmp_path / "m" / "unregistered").iterdir())) == 1


@pytest.mark.slow
def test_a_model_that_cannot_be_saved_where_asked_says_so_in_one_line(tmp_path: Path) -> None:
    """MODEL_DIR owned by the services (here: a file where the folder should be): one line naming --out."""
    (tmp_path / "m").write_text("not a folder")
    args = ("train", "--assessor", "cnn", "--data", "sim:60", "--set", "epochs=1", "--set", "batch_size=32")
    run = coilguard(*args, env={"COILGUARD_MODEL_DIR": str(tmp_path / "m")})
    assert run.returncode == 1 and "could not save the model to" in run.stderr and "--out" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_a_registration_overtaken_without_unless_serving_fails_instead_of_saying_done(
    tmp_path: Path, monkeypatch
) -> None:
    """`train --register` whose registration found the name's active version changed under it printed "stays a
    candidate (--unless-serving)", a flag nobody gave, and exited 0: a deploy script took the model as serving."""
    from click.testing import CliRunner

    import workflows.training
    from services.cli import cli
    from workflows.ports import ChampionChanged

    env = {"COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cg.db'}", "COILGUARD_MODEL_DIR": str(tmp_path)}
    upgrade(env["COILGUARD_DATABASE_URL"])

    def overtaken(*args: object, **kwargs: object) -> None:
        raise ChampionChanged("cnn v1 went into service meanwhile")

    monkeypatch.setattr(workflows.training, "register", overtaken)
    args = ["train", "--assessor", "cnn", "--data", "sim:60", "--set", "epochs=1", "--set", "batch_size=32"]
    run = CliRunner().invoke(cli, [*args, "--register"], env=env)
    assert run.exit_code == 1, run.output
    assert "was not put into service: cnn v1 went into service meanwhile" in run.output
    assert "--unless-serving" not in run.output


@pytest.mark.slow
def test_bad_options_are_usage_errors_not_tracebacks(tmp_path: Path) -> None:
    env = {"COILGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'cg.db'}", "COILGUARD_MODEL_DIR": str(tmp_path / "m")}
    assert coilguard("db", "upgrade", env=env).returncode == 0
    folder = write_image_folder(synthetic_tiles(4, 2), tmp_path / "images")
    cases = {
        ("evaluate", "--assessors", "cnn,ssim_ae"): "ssim_ae assesses surface images",
        ("evaluate", "--assessors", "cnn", "--data", str(folder)): "needs coils",
        ("evaluate", "--assessors", "cnn", "--data", "sim:abc"): "expected sim:N",
        ("evaluate", "--assessors", "cnn", "--data", str(tmp_path / "nosuch.npz")): "no dataset at",
        ("demo", "--kinds", "cnnn"): "not installed: cnnn",
        ("demo", "--rate", "0"): "--rate",
        ("demo", "--kinds", "cnn,rmcsam"): "rmcsam assesses surface images",
        ("retrain", "--model", "nosuch"): "no active model named nosuch (active: none)",
        ("score", "--every", "5x"): "not a duration: '5x'",
        ("drift", "--window", "24x"): "not a duration: '24x'",
        ("dataset", "--coils", "0", "--out", str(tmp_path / "d")): "--coils",
        ("train", "--assessor", "cnn", "--set", "seed=5"): "the seed is --seed",
        ("api", "--port", "0"): "--port",
        ("api", "--port", "70000"): "--port",
        ("simulate", "--coils", "-1"): "--coils",
        ("dataset", "--out", str(tmp_path / "d.npz"), "--drift", "knife-wear", "--severity", "8"): "between 0 and 3",
        ("evaluate", "--assessors", "cnn", "--folds", "1"): "--folds",
        ("evaluate", "--assessors", "cnn", "--repeats", "-1"): "--repeats",
        ("evaluate", "--assessors", "cnn,cnn"): "named more than once: cnn",
        ("evaluate", "--assessors", "cnn", "--data", "sim:30"): "needs at least 5 coils of each class",
    }
    for args, says in cases.items():
        run = coilguard(*args, env=env)
        assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


@pytest.mark.slow
def test_dataset_says_the_file_it_wrote(tmp_path: Path) -> None:
    run = coilguard("dataset", "--coils", "20", "--out", str(tmp_path / "d"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip().endswith(f"to {tmp_path / 'd.npz'}") and (tmp_path / "d.npz").is_file()
