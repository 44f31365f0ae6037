"""The two multi-class image assessors (``selfcon_margin``, ``rmcsam``) against the assessor contract, on tiny
synthetic images: they train in seconds, save, load and predict exactly what they predicted before, refuse
a tampered weights file, abstain on a coil without images, and turn defect types into the coil vote.
Their losses and the attention module are checked on their own; the NEU loader and the few-shot split
need the real images in ``../shared/datasets`` and are skipped without them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import stripe_coils, synthetic_images

from ml.assessors.base import AssessBatch
from ml.assessors.image_classifier import ImageClassifierAssessor
from ml.assessors.manifest import ArtifactError
from ml.assessors.rmcsam import RmcsamAssessor
from ml.assessors.rmcsam.torch_model import RMCSAM
from ml.assessors.selfcon_margin import SelfConMarginAssessor
from ml.assessors.selfcon_margin.loss import arc_margin_logits, arcface_loss, nt_xent, self_contrastive_loss
from ml.imagesets.base import ImageSet
from ml.training.image_augment import AugmentConfig, augment, dihedral_views, to_tensor

torch.set_num_threads(1)

FAMILIES: dict[str, type[ImageClassifierAssessor]] = {"selfcon_margin": SelfConMarginAssessor, "rmcsam": RmcsamAssessor}
TINY = {"epochs": 2, "imgsz": 32, "batch_size": 16, "seed": 5}  # over quick_settings: the contract is the point
DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


@pytest.fixture(scope="module")
def data() -> ImageSet:
    return synthetic_images()


@pytest.fixture(scope="module")
def fitted(data):
    cache: dict[str, ImageClassifierAssessor] = {}

    def get(key: str) -> ImageClassifierAssessor:
        if key not in cache:
            cls = FAMILIES[key]
            assessor = cls({**cls.quick_settings, **TINY})
            report = assessor.fit(data, device="cpu")
            assert report.epochs_run >= 1
            cache[key] = assessor
        return cache[key]

    return get


@pytest.fixture(params=list(FAMILIES))
def trained(request, fitted) -> ImageClassifierAssessor:
    return fitted(request.param)


def coil_batch(data: ImageSet) -> AssessBatch:
    """Four coils: one image, two images, none (must abstain), one more image."""
    images = [[data.images[0]], [data.images[9], data.images[17]], [], [data.images[20]]]
    return AssessBatch(np.full((4, 264, 18), 140.0, np.float32), images)


def test_fit_records_data_settings_metrics_and_runtime(trained, data):
    from ml.imagesets.folder import content_digest

    manifest = trained.manifest()
    assert manifest.consumes == "image"
    assert manifest.training_data["classes"] == ["ok", "scratch", "spot"]
    assert manifest.training_data["content_sha256"] == content_digest(data)  # the very images, a draw's own
    assert manifest.training_data["n_train"] + manifest.training_data["n_validation"] == 24
    assert manifest.settings["imgsz"] == 32 and manifest.settings["seed"] == 5
    assert {"train", "validation"} <= set(manifest.metrics)
    assert "class_accuracy" in manifest.metrics["validation"]
    assert "f1_nok" in manifest.metrics["validation"]  # there is a defect-free class, so OK/NOK is measured
    for key in ("device", "duration_s", "torch", "platform", "history", "epochs_run", "start"):
        assert key in manifest.runtime
    json.dumps(manifest.model_dump(mode="json"))


def test_save_load_predicts_identically(trained, data, tmp_path):
    batch = coil_batch(data)
    raw = trained.predict_raw(batch)
    p_nok, confidence = trained.predict(batch)
    classes, probs = trained.predict_classes(data.images)
    trained.save(tmp_path)
    loaded = type(trained).load(tmp_path)
    np.testing.assert_array_equal(loaded.predict_raw(batch), raw)
    np.testing.assert_array_equal(loaded.predict(batch)[0], p_nok)
    np.testing.assert_array_equal(loaded.predict(batch)[1], confidence)
    loaded_classes, loaded_probs = loaded.predict_classes(data.images)
    np.testing.assert_array_equal(loaded_classes, classes)
    np.testing.assert_array_equal(loaded_probs, probs)
    assert loaded.threshold == trained.threshold and loaded.classes == trained.classes
    assert probs.shape == (len(data), 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_tampered_weights_are_refused(trained, tmp_path):
    trained.save(tmp_path)
    path = tmp_path / "weights.pt"
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError):
        type(trained).load(tmp_path)


def test_abstains_without_images_and_takes_the_worst_image(trained, data):
    raw = trained.predict_raw(coil_batch(data))
    assert np.isnan(raw[2]) and np.isfinite(raw[[0, 1, 3]]).all()
    _, probs = trained.predict_classes([data.images[9], data.images[17]])
    assert raw[1] == pytest.approx(float((1 - probs[:, 0]).max()), abs=1e-6)  # class 0 is the defect-free one
    assert np.isnan(trained.predict_raw(AssessBatch(np.full((2, 264, 18), 140.0, np.float32)))).all()


def test_same_seed_same_model(data):
    settings = {**TINY, "epochs": 1, "attention": False}
    a, b = RmcsamAssessor(settings), RmcsamAssessor(settings)
    a.fit(data, device="cpu")
    b.fit(data, device="cpu")
    np.testing.assert_array_equal(a.predict_classes(data.images)[1], b.predict_classes(data.images)[1])


def test_defect_types_only_abstain_from_the_vote_but_name_the_type(data):
    defects = data.subset(np.flatnonzero(data.labels > 0))
    defects = ImageSet(defects.images, defects.labels - 1, ["scratch", "spot"])
    assessor = RmcsamAssessor({**TINY, "epochs": 1, "holdout": False})
    assessor.fit(defects, device="cpu")
    assert "validation" not in assessor.metrics and assessor.threshold == 0.5
    assert np.isnan(assessor.predict_raw(coil_batch(data))).all()
    classes, probs = assessor.predict_classes(defects.images[:3])
    assert classes.shape == (3,) and probs.shape == (3, 2)


def test_fits_on_coils_rendered_as_images():
    coils = stripe_coils(24, nok_share=0.3, seed=4)
    assessor = SelfConMarginAssessor({**TINY, "epochs": 1})
    assessor.fit(coils, device="cpu")
    assert assessor.classes == ["OK", "NOK"] and assessor.training_data["source"]["source"] == "coils"
    image = np.random.default_rng(0).random((50, 50)).astype(np.float32)
    raw = assessor.predict_raw(AssessBatch(coils.X[:2], [[image], []]))
    assert 0 <= raw[0] <= 1 and np.isnan(raw[1])


def test_warm_start_needs_a_trained_assessor_of_the_same_classes(fitted, data):
    champion = fitted("rmcsam")
    challenger = RmcsamAssessor({**TINY, "epochs": 1})
    challenger.fit(data, init=champion, device="cpu")
    assert challenger.runtime["start"] == "init"
    with pytest.raises(TypeError):
        RmcsamAssessor(TINY).fit(data, init=fitted("selfcon_margin"), device="cpu")


# ---------------------------------------------------------------------- losses, attention, images


def test_nt_xent_prefers_matching_views():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    assert nt_xent(a, a + 0.01 * torch.randn(8, 16)) < nt_xent(a, torch.randn(8, 16))
    # identical views: each positive has cosine 1, so the loss is below log(2N − 1), the uninformed value
    assert float(self_contrastive_loss(a, a, a)) < math.log(15)


def test_arcface_is_scaled_softmax_without_margin_and_penalizes_the_true_class():
    torch.manual_seed(0)
    cosine = torch.rand(5, 4) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 0])
    assert torch.allclose(arcface_loss(cosine, labels, margin=0.0, scale=10.0), F.cross_entropy(10 * cosine, labels))
    logits = arc_margin_logits(cosine, labels, margin=0.5, scale=10.0)
    target = F.one_hot(labels, 4).bool()
    assert (logits[target] < 10 * cosine[target]).all() and torch.equal(logits[~target], 10 * cosine[~target])


def test_rmcsam_keeps_shape_and_starts_near_identity():
    x = torch.rand(2, 1280, 3, 3)
    with torch.no_grad():
        out = RMCSAM()(x)
    assert out.shape == x.shape
    assert float((out / x.clamp_min(1e-6)).median()) == pytest.approx(1.0, abs=0.5)


def test_augment_is_seeded_and_keeps_range():
    gray = to_tensor([np.random.default_rng(1).random((40, 30)).astype(np.float32)] * 4, 32)
    config = AugmentConfig(max_degrees=10)
    a = augment(gray, config, torch.Generator().manual_seed(3))
    b = augment(gray, config, torch.Generator().manual_seed(3))
    assert a.shape == (4, 1, 32, 32) and torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) <= 1


def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    gray = torch.arange(16.0).view(1, 1, 4, 4)
    views = dihedral_views(gray, 8)
    assert views.shape == (8, 1, 4, 4)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # all different
    assert torch.equal(dihedral_views(gray, 4)[1:2], gray.flip(-1)) and torch.equal(dihedral_views(gray, 1), gray)
    turned = torch.rot90(gray, 1, dims=(-2, -1))
    assert {tuple(v.flatten().tolist()) for v in dihedral_views(turned, 8)} == {
        tuple(v.flatten().tolist()) for v in views
    }  # a group: the views of a turned image are the same eight
    with pytest.raises(ValueError):
        dihedral_views(gray, 3)


def test_selfcon_views_make_the_embedding_indifferent_to_flips_and_turns(data, tmp_path):
    assessor = SelfConMarginAssessor({**SelfConMarginAssessor.quick_settings, **TINY, "epochs": 1, "views": 8})
    assessor.fit(data, device="cpu")
    image = data.images[9]
    images = [image, image[:, ::-1].copy(), np.rot90(image).copy()]
    _, probs = assessor.predict_classes(images)
    np.testing.assert_allclose(probs[1], probs[0], atol=1e-5)
    np.testing.assert_allclose(probs[2], probs[0], atol=1e-5)
    single = SelfConMarginAssessor({**SelfConMarginAssessor.quick_settings, **TINY, "epochs": 1})
    single.fit(data, device="cpu")
    _, single_probs = single.predict_classes([image, image[:, ::-1].copy()])
    assert not np.allclose(single_probs[1], single_probs[0], atol=1e-5)  # one view is not indifferent
    assessor.save(tmp_path)
    np.testing.assert_array_equal(type(assessor).load(tmp_path).predict_classes(images)[1], probs)


# ---------------------------------------------------------------------- the real NEU images


def _neu_root() -> Path:
    root = DATASETS / "neu-det"
    if not (root / "images").is_dir():
        pytest.skip(f"NEU-DET images not found at {root} (the shared datasets folder beside the checkout)")
    return root


@pytest.mark.datasets
def test_load_neu_six_classes():
    from ml.imagesets.neu import NEU_CLASSES, load_neu

    neu = load_neu(_neu_root(), size=64)
    assert neu.classes == NEU_CLASSES and len(neu) == 600
    assert np.bincount(neu.labels).tolist() == [100] * 6
    assert neu.images[0].shape == (64, 64) and neu.images[0].dtype == np.float32
    assert min(float(i.min()) for i in neu.images) >= 0 and max(float(i.max()) for i in neu.images) <= 1
    assert neu.nok.all()  # every NEU class is a defect


@pytest.mark.datasets
def test_few_shot_split_draws_k_per_class_and_tests_on_the_rest():
    from ml.imagesets.neu import few_shot_split, load_neu

    neu = load_neu(_neu_root(), size=32)
    train, test = few_shot_split(neu, 10, seed=1)
    assert np.bincount(neu.labels[train]).tolist() == [10] * 6
    assert len(test) == 540 and not set(train) & set(test)
    assert np.array_equal(few_shot_split(neu, 10, seed=1)[0], train)
    assert not np.array_equal(few_shot_split(neu, 10, seed=2)[0], train)
    with pytest.raises(ValueError):
        few_shot_split(neu, 100, seed=0)


def test_no_training_batch_of_one_and_no_registration_of_a_model_that_can_only_abstain(tmp_path: Path) -> None:
    """Five training images two at a time were split 2, 2, 1, and rmcsam's attention fails on a batch of one at a
    small imgsz. A classifier of defect types alone (NEU: no defect-free class) abstains on every coil: registered,
    it decoded every image for nothing, and alone it failed every coil as "needs a matrix assessor"."""
    from ml.assessors.image_classifier import even_batches
    from ml.ensemble import Ensemble, Member
    from services.db.engine import make_engine
    from services.db.migrate import upgrade
    from services.db.repositories import SqlModelRegistry
    from workflows.training import register

    assert [len(b) for b in even_batches(np.arange(5), 2)] == [3, 2]
    assert [len(b) for b in even_batches(np.arange(6), 2)] == [2, 2, 2]
    assert [len(b) for b in even_batches(np.arange(3), 16)] == [3]
    defects_only = synthetic_images(per_class=4, classes=("scratch", "spot"))
    model = RmcsamAssessor({**RmcsamAssessor.quick_settings, **TINY, "epochs": 1, "batch_size": 2})
    model.fit(defects_only, device="cpu")  # 8 images, two at a time: no batch of one reaches batch norm
    assert not model.can_vote and not Ensemble([Member(model, 1.0)]).needs_images
    url = f"sqlite:///{tmp_path / 'cg.db'}"
    upgrade(url)
    engine = make_engine(url)
    with pytest.raises(ValueError, match="gives no coil a NOK probability"):
        register(model, SqlModelRegistry(engine), tmp_path / "models", status="active")
    engine.dispose()
