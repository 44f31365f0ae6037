"""Every matrix assessor family against the contract: trains on tiny data, saves, loads and predicts exactly
what it predicted before saving, refuses tampered weights, warm-starts from a trained instance (ReTrain),
validates its settings; plus what is particular to YOLO (offline, weights file, freezing), EfficientNet
(ImageNet weights from the installed file) and the Siamese network (pair mix, references)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import as_written_by_release_1, edit_manifest, stripe_coils

from ml.assessors.base import AssessBatch, Assessor
from ml.assessors.manifest import MANIFEST_FILE, ArtifactError
from ml.assessors.registry import assessor_class, available, create, load_artifact
from ml.dataset import LEARNED_BY_INIT
from ml.training.pairs import all_pairs, balanced_pairs, pair_batches, pair_type_weights
from ml.training.render import render_gray, render_rgb, tile
from ml.training.runtime import channels_last

KEYS = ["cnn", "yolo", "effnet", "siamese"]
# the smallest, fastest configuration of each family: the contract is the point here, not quality
TINY: dict[str, dict] = {
    "cnn": {"epochs": 1, "batch_size": 32, "seed": 3},
    "yolo": {"epochs": 2, "batch_size": 16, "seed": 3, "size": "n", "imgsz": 32},  # batch-norm statistics need steps
    "effnet": {"epochs": 1, "batch_size": 32, "seed": 3, "imgsz": 32},
    "siamese": {"epochs": 2, "batch_size": 32, "seed": 3},
}


@pytest.fixture(scope="module")
def data():
    return stripe_coils(120, seed=1)


@pytest.fixture(scope="module")
def unseen():
    return stripe_coils(40, seed=2)


@pytest.fixture(scope="module")
def fitted(data):
    """One trained instance per family, trained on first use and shared by the tests of this module."""
    cache: dict[str, Assessor] = {}

    def get(key: str) -> Assessor:
        if key not in cache:
            assessor = create(key, TINY[key])
            report = assessor.fit(data, device="cpu")
            assert report.epochs_run >= 1 and "validation" in assessor.metrics
            cache[key] = assessor
        return cache[key]

    return get


@pytest.fixture(params=KEYS)
def trained(request, fitted) -> Assessor:
    return fitted(request.param)


def test_the_families_are_installed_as_plugins() -> None:
    found = available()
    for key in KEYS:
        assert key in found and found[key].key == key
        assert assessor_class(key) is found[key]


def test_a_key_two_packages_declare_is_refused_not_picked_by_install_order(
    monkeypatch: pytest.MonkeyPatch, fitted, tmp_path: Path
) -> None:
    """Was: `create` and loading took the first entry point of the key, `available()` the last; a model trained by
    one package's class could be loaded by the other's."""
    from importlib.metadata import EntryPoint

    import ml.assessors.registry as registry

    fitted("cnn").save(tmp_path / "m")  # trained while the key is still one package's
    real = registry.entry_points
    twin = EntryPoint("cnn", "other_package.assessors:Cnn", registry.GROUP)

    def declared(**kwargs):
        found = list(real(**kwargs))
        return [*found, twin] if kwargs.get("name", "cnn") == "cnn" else found

    monkeypatch.setattr(registry, "entry_points", declared)
    with pytest.raises(TypeError, match=r"declared by ml\.assessors\.cnn:CnnAssessor and other_package"):
        assessor_class("cnn")
    assert "cnn" not in available() and "yolo" in available()
    with pytest.raises(ArtifactError, match="uninstall one"):
        load_artifact(tmp_path / "m")


def test_trains_saves_loads_and_predicts_identically(trained: Assessor, unseen, tmp_path: Path) -> None:
    p, c = trained.predict(AssessBatch(unseen.X))
    assert p.shape == (len(unseen),) and np.isfinite(p).all()
    assert np.all((p >= 0) & (p <= 1)) and np.all((c >= 0.5) & (c <= 1))
    assert np.unique(p).size > 1  # a constant output would make the comparison below meaningless
    manifest = trained.save(tmp_path / trained.key)
    assert manifest.kind == trained.key and set(manifest.files) == set(trained.weight_files)
    assert manifest.normalization and manifest.training_data["n_coils"] == 120
    again = load_artifact(tmp_path / trained.key)
    assert type(again) is type(trained) and again.threshold == trained.threshold
    p2, c2 = again.predict(AssessBatch(unseen.X))
    np.testing.assert_array_equal(p, p2)
    np.testing.assert_array_equal(c, c2)
    # saved again (ReTrain's read-through candidate, a re-sealed legacy model): what trained it is kept
    trained_by = {"created_at": manifest.created_at.isoformat(), "code_version": manifest.code_version}
    resaved = again.save(tmp_path / "again")
    assert resaved.runtime["trained"] == trained_by
    assert load_artifact(tmp_path / "again").runtime["trained"] == trained_by  # and not replaced once more


@pytest.mark.parametrize("key", ["cnn", "yolo", "effnet"])
def test_networks_train_and_load_channels_last(fitted, key: str, tmp_path: Path) -> None:
    """NHWC is a speed choice (bench/layout.py); a loaded model computes in the layout it was checked in."""
    trained = fitted(key)
    trained.save(tmp_path / key)
    for net in (trained.net, load_artifact(tmp_path / key).net):
        convs = [p for p in net.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    batch = torch.zeros(2, 3, 8, 8)
    assert channels_last(batch).is_contiguous(memory_format=torch.channels_last)
    assert not batch.is_contiguous(memory_format=torch.channels_last)
    assert channels_last(torch.zeros(2, 8, 8)).is_contiguous()  # not an image batch: left as it is


def test_a_tampered_weights_file_is_refused(trained: Assessor, tmp_path: Path) -> None:
    for name in trained.weight_files:
        directory = tmp_path / name
        trained.save(directory)
        path = directory / name
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # one flipped byte
        path.write_bytes(bytes(raw))
        with pytest.raises(ArtifactError, match="does not match"):
            load_artifact(directory)
        path.unlink()
        with pytest.raises(ArtifactError, match="missing"):
            load_artifact(directory)


def test_a_manifest_that_leaves_out_a_weight_file_is_refused(trained: Assessor, tmp_path: Path) -> None:
    """Only the files a manifest lists get their checksums checked: one left out of the list would go unchecked.
    The manifest claims integrity version 1 here, so that only the file list, not its own checksum, can notice."""
    for name in trained.weight_files:
        directory = tmp_path / name
        trained.save(directory)
        edit_manifest(directory, as_written_by_release_1)
        edit_manifest(directory, lambda content, gone=name: content["files"].pop(gone))
        with pytest.raises(
            ArtifactError,
            match=re.escape(f"{MANIFEST_FILE} lists the weight files") + r".*" + re.escape(f"not listed: ['{name}']"),
        ):
            load_artifact(directory)


def test_warm_start_from_a_trained_instance(trained: Assessor, data, unseen) -> None:
    challenger = create(trained.key, TINY[trained.key])
    challenger.fit(data, init=trained, device="cpu")
    assert challenger.normalizer == trained.normalizer  # the champion's scale is kept
    p, _ = challenger.predict(AssessBatch(unseen.X))
    assert np.isfinite(p).all()
    if trained.key != "cnn":
        assert challenger.runtime["start"] == "init"
    marked = data.subset(np.arange(len(data)))  # ReTrain's marks: everything the champion did not validate on
    validated = trained.training_data["validation_coils"]
    marked.columns[LEARNED_BY_INIT] = (~np.isin(marked.coil_id, validated)).tolist()
    challenger.fit(marked, init=trained, device="cpu")
    assert challenger.training_data["validation_coils"] == validated  # validated on nothing the champion learned
    with pytest.raises(TypeError, match="warm-start"):
        create(trained.key, TINY[trained.key]).fit(data, init=create("cnn" if trained.key != "cnn" else "yolo"))


@pytest.mark.parametrize("key", KEYS)
def test_settings_are_validated(key: str) -> None:
    cls = assessor_class(key)
    defaults = cls.Settings()
    assert 1 <= defaults.epochs <= 50 and defaults.patience == 5 and defaults.class_weight_nok == 5.0
    cls(cls.quick_settings)  # the demo's settings are valid
    with pytest.raises(ValueError, match="epochs"):
        create(key, {"epochs": 0})
    with pytest.raises(ValueError, match="extra"):
        create(key, {"no_such_setting": 1})
    bad = {
        "cnn": {"depth": 0},
        "yolo": {"size": "x"},
        "effnet": {"freeze": 8},
        "siamese": {"references": 0},
    }[key]
    with pytest.raises(ValueError):
        create(key, bad)


# ---------------------------------------------------------------- rendering


def test_tiling_keeps_sensors_in_their_columns_and_sections_in_order() -> None:
    x = torch.arange(264 * 18, dtype=torch.float32).reshape(1, 264, 18)
    out = tile(x)
    assert out.shape == (1, 66, 72)  # four segments of 66 sections side by side
    np.testing.assert_array_equal(out[0, :, 18:36].numpy(), x[0, 66:132].numpy())
    img = render_gray(np.random.default_rng(0).random((3, 264, 18), dtype=np.float32), 64, "tile")
    assert img.shape == (3, 1, 64, 64) and img.dtype == torch.float32
    rgb = render_rgb(np.full((2, 264, 18), 0.485, dtype=np.float32), 48, "resize")
    assert rgb.shape == (2, 3, 48, 48) and abs(float(rgb[:, 0].mean())) < 1e-5  # ImageNet mean maps to 0
    with pytest.raises(ValueError, match="render"):
        render_gray(np.zeros((1, 264, 18), np.float32), 32, "stretch")  # type: ignore[arg-type]


# ---------------------------------------------------------------- YOLO


def _fake_yolov8n_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """An ultralytics-style checkpoint ({"model": module}) of a 3-channel, 1000-class YOLOv8n-cls."""
    from copy import deepcopy

    from ml.assessors.yolo.torch_model import ultralytics_offline, yolov8_cls_yaml

    tasks = ultralytics_offline()
    body, _ = tasks.parse_model(deepcopy(yolov8_cls_yaml("n", nc=1000, channels=3)), ch=3, verbose=False)
    holder = torch.nn.Module()
    holder.model = body
    torch.nn.init.normal_(body[0].conv.weight)
    torch.save({"model": holder, "train_args": {}}, path)
    return {k: v.clone() for k, v in holder.state_dict().items()}


def test_yolo_starts_from_a_weights_file_freezes_layers_and_never_goes_online(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "yolov8n-cls.pt"
    original = _fake_yolov8n_checkpoint(weights)

    def offline(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    yolo = create("yolo", {**TINY["yolo"], "weights": str(weights), "freeze": 7})
    yolo.fit(data, device="cpu")
    assert yolo.runtime["start"] == "file" and yolo.runtime["frozen_layers"] == 7
    assert yolo.runtime["pretrained"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()  # reproducible
    state = yolo.net.state_dict()
    # grayscale folded into the pretrained RGB stem; frozen layers untouched, batch-norm statistics included
    torch.testing.assert_close(state["model.0.conv.weight"], original["model.0.conv.weight"].sum(1, keepdim=True))
    for key in ("model.6.m.0.cv1.conv.weight", "model.6.m.0.cv1.bn.running_mean"):
        torch.testing.assert_close(state[key], original[key])
    assert not torch.equal(state["model.8.cv2.conv.weight"], original["model.8.cv2.conv.weight"])  # fine-tuned
    assert state["model.9.linear.weight"].shape == (1, 1280)  # one logit, not the file's 1000 classes

    missing = create("yolo", {**TINY["yolo"], "weights": str(tmp_path / "absent.pt")})
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        missing.fit(data, device="cpu")


_IMPORT_OFFLINE = """
import socket

def offline(*args, **kwargs):
    raise SystemExit(f"the network was touched: {args[:2]!r}")

socket.getaddrinfo = offline
socket.socket.connect = offline
from ml.assessors.yolo.torch_model import ultralytics_offline

ultralytics_offline()
import ultralytics.utils

print("online" if ultralytics.utils.ONLINE else "offline")
"""


def test_ultralytics_is_imported_offline_in_a_fresh_process() -> None:
    """The check above runs after ultralytics was imported by an earlier test; its probe runs at import, in a
    worker's first prediction, so a fresh interpreter is where it shows (with YOLO_OFFLINE unset by the plant)."""
    env = {k: v for k, v in os.environ.items() if k != "YOLO_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", _IMPORT_OFFLINE], env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "offline"), done.stderr[-2000:]


def test_yolo_without_weights_trains_from_scratch_with_nothing_frozen(fitted) -> None:
    yolo = fitted("yolo")
    assert yolo.runtime["start"] == "scratch" and yolo.runtime["frozen_layers"] == 0
    assert all(p.requires_grad for p in yolo.net.parameters())


# ---------------------------------------------------------------- EfficientNet


def test_effnet_fine_tunes_the_installed_imagenet_weights(fitted) -> None:
    from ml.assessors.effnet.torch_model import imagenet_weights_file

    effnet = fitted("effnet")
    imagenet = torch.load(imagenet_weights_file(), map_location="cpu", weights_only=True)
    net = effnet.net.net
    assert effnet.runtime["start"] == "imagenet" and effnet.runtime["frozen_stages"] == 3
    torch.testing.assert_close(net._conv_stem.weight, imagenet["_conv_stem.weight"])  # frozen
    torch.testing.assert_close(net._blocks[4]._bn1.running_var, imagenet["_blocks.4._bn1.running_var"])  # stage 3
    assert not torch.equal(net._conv_head.weight, imagenet["_conv_head.weight"])  # fine-tuned


# ---------------------------------------------------------------- Siamese


def test_siamese_pairs_follow_the_papers_mix() -> None:
    y = np.array([1] * 10 + [0] * 300)
    rng = np.random.default_rng(0)
    batches = pair_batches(y, 32, rng)
    kinds = np.zeros(3)
    for idx in batches:
        assert 0 < y[idx].sum() <= 16
        labels = torch.as_tensor(y[idx])
        left, right, same = all_pairs(labels)
        assert torch.equal(same, (labels[left] == labels[right]).float())
        w = pair_type_weights(labels[left], labels[right])
        kind = (labels[left] + labels[right]).numpy()
        kinds += [w[kind == k].sum().item() for k in (0, 1, 2)]
    assert sum(int(y[idx].sum() * (y[idx].sum() - 1) / 2) for idx in batches) >= 100  # about N_NOK² NOK–NOK
    np.testing.assert_allclose(kinds / kinds.sum(), [0.25, 0.5, 0.25], atol=1e-6)  # OK–OK : OK–NOK : NOK–NOK
    pairs = balanced_pairs(y, rng)
    kind = y[pairs.left] + y[pairs.right]
    assert np.sum(kind == 2) == 100 and np.sum(kind == 0) == 100 and np.sum(kind == 1) == 200
    assert np.array_equal(pairs.same, (kind != 1).astype(int))
    assert len(np.unique(pairs.left[kind == 1].tolist() + pairs.right[kind == 1].tolist())) > 150  # many OKs


def test_siamese_scores_against_k_means_references(fitted, tmp_path: Path) -> None:
    siamese = fitted("siamese")
    refs = siamese.references
    assert refs.ok.shape == (3, siamese.settings.embedding_dim) and refs.nok.shape == refs.ok.shape
    assert len(set(siamese.runtime["references"]["NOK"])) == 3  # three different NOK coils
    siamese.save(tmp_path)
    loaded = load_artifact(tmp_path)
    assert torch.equal(loaded.references.nok, refs.nok) and torch.equal(loaded.references.ok, refs.ok)


def test_siamese_training_is_reproducible_by_seed(data) -> None:
    runs = []
    for _ in range(2):
        siamese = create("siamese", TINY["siamese"])
        siamese.fit(data, device="cpu")
        runs.append(siamese.predict_raw(AssessBatch(data.X[:20])))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_importing_ultralytics_leaves_the_thread_setting_of_later_processes_alone() -> None:
    """ultralytics sets OMP_NUM_THREADS=1 on import; a worker started afterwards would run on one core."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = (
        "import os; from ml.assessors.yolo.torch_model import ultralytics_offline; ultralytics_offline(); "
        "import ultralytics; print(os.environ.get('OMP_NUM_THREADS'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None", out.stdout


def test_importing_ultralytics_on_a_fresh_machine_prints_nothing_and_its_warnings_reach_our_logs(
    tmp_path: Path,
) -> None:
    """Its first import creates a settings file and announces it, with a docs link, on stdout; coilguard's
    logs and the demo must not carry that, and its warnings must still be seen."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "YOLO_VERBOSE"}
    env["YOLO_CONFIG_DIR"] = str(tmp_path)  # no settings file yet, as on a fresh machine
    code = (
        "import logging, os; logging.basicConfig(format='root: %(message)s');"
        "from ml.assessors.yolo.torch_model import ultralytics_offline; ultralytics_offline();"
        "from ultralytics.utils import LOGGER; LOGGER.info('an info line'); LOGGER.warning('a warning');"
        "print(os.environ.get('YOLO_VERBOSE'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None", out.stdout  # nothing but ours, and the variable put back
    assert "root: " in out.stderr and "a warning" in out.stderr and "an info line" not in out.stderr, out.stderr
    settings = json.loads((tmp_path / "Ultralytics" / "settings.json").read_text())
    assert settings["sync"] is False


@pytest.mark.parametrize("kind", ["cnn", "siamese"])
def test_a_challenger_warm_starts_only_from_a_trained_assessor_of_its_own_kind(kind: str) -> None:
    data = stripe_coils(40, seed=3)
    other = "siamese" if kind == "cnn" else "cnn"
    with pytest.raises(TypeError, match=f"cannot warm-start a {kind} assessor"):
        create(kind, {"epochs": 1}).fit(data, init=create(other, {"epochs": 1}), device="cpu")
    with pytest.raises(TypeError, match="cannot warm-start"):  # right kind, never trained
        create(kind, {"epochs": 1}).fit(data, init=create(kind, {"epochs": 1}), device="cpu")


@pytest.mark.parametrize(
    ("key", "setting", "value"),
    [
        ("ssim_ae", "threshold_rule", "f1"),
        ("contrastive_seg", "class_weight_nok", 2.0),
        ("siamese", "oversample_nok", 5),
    ],
)
def test_a_shared_setting_the_assessor_ignores_is_refused_for_a_new_model(
    key: str, setting: str, value: object
) -> None:
    """`--set threshold_rule=f1` on the autoencoder used to be accepted, recorded in the manifest, and change
    nothing (its thresholds are Youden's J). Refused where a model is made; a saved manifest still loads."""
    with pytest.raises(ValueError, match=f"{setting} has no effect on this assessor"):
        create(key, {setting: value})
    default = assessor_class(key).Settings.model_fields[setting].default
    assert create(key, {setting: default}).settings.model_dump()[setting] == default  # at its default: fine
    assert getattr(assessor_class(key)({setting: value}).settings, setting) == value  # what loading does
    legacy = assessor_class(key)({setting: value}).settings  # a manifest from before the refusal
    assert create(key, legacy.inherited()).settings.model_dump()[setting] == default  # how ReTrain carries it on
