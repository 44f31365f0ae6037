"""The two surface-image assessors of the magnetic-tile work against the assessor contract: ``ssim_ae``
(SSIM autoencoder trained on defect-free images) and ``contrastive_seg`` (segmenter with an InfoNCE
branch). Each trains on tiny synthetic images in seconds, saves, loads and predicts exactly what it
predicted before, refuses a tampered weights file, and abstains on a coil without images; plus the
image-folder loaders, the losses, and (marked ``datasets``) the real magnetic-tile set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import stripe_coils, synthetic_tiles
from PIL import Image

from ml.assessors.base import AssessBatch, Assessor
from ml.assessors.contrastive_seg import ContrastiveSegAssessor
from ml.assessors.contrastive_seg.loss import combo_loss, proposal_contrastive_loss
from ml.assessors.manifest import ArtifactError
from ml.assessors.ssim_ae import SsimAeAssessor
from ml.assessors.ssim_ae.loss import dssim_loss, residual_map
from ml.imagesets.base import ImageSet
from ml.imagesets.folder import image_set_summary, load_folder, resize_mask
from ml.imagesets.magnetic_tile import CLASSES, load_magnetic_tile
from ml.imagesets.near_copies import group_holdout, near_copy_groups
from ml.training.runtime import seed_everything

torch.set_num_threads(1)

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"
TILE = DATASETS / "magnetic-tile"

TINY: dict[str, dict] = {
    "ssim_ae": {"epochs": 2, "width": 4, "batch_size": 8, "latent_dim": 16, "seed": 3},
    "contrastive_seg": {**ContrastiveSegAssessor.quick_settings, "epochs": 2, "seed": 3},
}
CLASSES_BY_KEY = {"ssim_ae": SsimAeAssessor, "contrastive_seg": ContrastiveSegAssessor}


def coil_batch(images: list[list[np.ndarray]]) -> AssessBatch:
    return AssessBatch(np.full((len(images), 264, 18), 140.0, np.float32), images)


@pytest.fixture(scope="module")
def tiles() -> ImageSet:
    return synthetic_tiles()


@pytest.fixture(scope="module")
def unseen() -> ImageSet:
    return synthetic_tiles(4, 4, seed=9)


@pytest.fixture(scope="module")
def fitted(tiles):
    cache: dict[str, Assessor] = {}

    def get(key: str) -> Assessor:
        if key not in cache:
            assessor = CLASSES_BY_KEY[key](TINY[key])
            report = assessor.fit(tiles, device="cpu")
            assert report.epochs_run >= 1 and report.device == "cpu"
            cache[key] = assessor
        return cache[key]

    return get


@pytest.fixture(params=list(TINY))
def trained(request, fitted) -> Assessor:
    return fitted(request.param)


def test_trains_saves_loads_and_predicts_identically(trained: Assessor, unseen: ImageSet, tmp_path: Path) -> None:
    batch = coil_batch([[im] for im in unseen.images] + [[unseen.images[0], unseen.images[-1]]])
    p, c = trained.predict(batch)
    assert p.shape == (len(unseen) + 1,) and np.isfinite(p).all()
    assert np.all((p >= 0) & (p <= 1)) and np.all((c >= 0.5) & (c <= 1))
    assert p[-1] == max(p[0], p[len(unseen) - 1])  # a coil with several images takes the worst
    manifest = trained.save(tmp_path / trained.key)
    assert manifest.kind == trained.key and manifest.consumes == "image"
    assert set(manifest.files) == set(trained.weight_files)
    assert manifest.training_data["n_images"] == 20 and manifest.settings["seed"] == 3
    assert {"device", "duration_s", "torch", "platform", "history"} <= set(manifest.runtime)
    assert manifest.runtime["platform"].startswith("torch ") and "numpy" in manifest.runtime["platform"]
    assert "pixel_threshold" in manifest.calibration and manifest.metrics["validation"]
    again = type(trained).load(tmp_path / trained.key)
    assert again.threshold == trained.threshold and again.pixel_threshold == trained.pixel_threshold
    p2, c2 = again.predict(batch)
    np.testing.assert_array_equal(p, p2)
    np.testing.assert_array_equal(c, c2)


def test_a_tampered_weights_file_is_refused(trained: Assessor, tmp_path: Path) -> None:
    trained.save(tmp_path)
    path = tmp_path / trained.weight_files[0]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="does not match"):
        type(trained).load(tmp_path)


def test_abstains_on_a_coil_without_images(trained: Assessor, unseen: ImageSet) -> None:
    p, c = trained.predict(coil_batch([[], [unseen.images[0]], []]))
    assert np.isnan(p[0]) and np.isnan(p[2]) and np.isnan(c[0]) and np.isfinite(p[1])
    p_none, _ = trained.predict(AssessBatch(np.full((2, 264, 18), 140.0, np.float32)))
    assert np.isnan(p_none).all()  # no images at all: every coil abstains


def test_warm_start_from_a_trained_instance(trained: Assessor, tiles: ImageSet) -> None:
    challenger = type(trained)({**TINY[trained.key], "epochs": 1})
    challenger.fit(tiles, init=trained, device="cpu")
    assert challenger.runtime["start"] == "init"
    other = SsimAeAssessor if trained.key != "ssim_ae" else ContrastiveSegAssessor
    with pytest.raises(TypeError, match="warm-start"):
        type(trained)(TINY[trained.key]).fit(tiles, init=other(TINY[other.key]), device="cpu")


def test_ssim_ae_trains_on_ok_images_of_rendered_coils() -> None:
    coils = stripe_coils(30, seed=4)
    assessor = SsimAeAssessor({**TINY["ssim_ae"], "epochs": 1})
    assessor.fit(coils, device="cpu")
    assert assessor.training_data["source"] == "coils"
    assert assessor.training_data["n_train_ok"] + assessor.training_data["n_val_ok"] == int((coils.y == 0).sum())
    assert assessor.metrics["validation"]["pixel_threshold_rule"].startswith("ok_quantile")  # coils have no masks


def test_ssim_ae_reports_whether_it_beats_the_mean_image(fitted, caplog: pytest.LogCaptureFixture) -> None:
    assessor = fitted("ssim_ae")
    check = assessor.metrics["validation"]
    assert check["mean_image_dssim"] > 0 and check["reconstruction_gain"] == pytest.approx(
        1 - check["dssim"] / check["mean_image_dssim"]
    )
    rng = np.random.default_rng(0)
    train = rng.random((4, 128, 128), dtype=np.float32)
    val = rng.random((3, 128, 128), dtype=np.float32)
    mean_dssim = float(
        dssim_loss(
            torch.from_numpy(val[:, None]), torch.from_numpy(np.broadcast_to(train.mean(0), val.shape)[:, None].copy())
        )
    )
    with caplog.at_level("WARNING"):
        collapsed = assessor._reconstruction_check(mean_dssim, train, 3, val)
    assert collapsed["reconstruction_gain"] == pytest.approx(0, abs=1e-6) and "mean training image" in caplog.text
    caplog.clear()
    assert assessor._reconstruction_check(0.0, train, 3, val)["reconstruction_gain"] == 1.0
    assert not caplog.text


def test_ssim_ae_without_defects_thresholds_on_ok_quantiles(tiles: ImageSet) -> None:
    ok_only = tiles.subset(np.flatnonzero(tiles.nok == 0))
    assessor = SsimAeAssessor({**TINY["ssim_ae"], "epochs": 1, "score": "area"})
    assessor.fit(ok_only, device="cpu")
    rules = assessor.metrics["validation"]
    assert rules["pixel_threshold_rule"].startswith("ok_quantile") and rules["image_threshold_rule"].startswith("ok")
    with pytest.raises(ValueError, match="defect-free"):
        SsimAeAssessor(TINY["ssim_ae"]).fit(tiles.subset(np.flatnonzero(tiles.nok == 1)), device="cpu")


def test_contrastive_seg_needs_masks(tiles: ImageSet) -> None:
    with pytest.raises(ValueError, match="masks"):
        ContrastiveSegAssessor(TINY["contrastive_seg"]).fit(stripe_coils(20), device="cpu")
    no_masks = ImageSet(tiles.images, tiles.labels, tiles.classes)
    with pytest.raises(ValueError, match="masks"):
        ContrastiveSegAssessor(TINY["contrastive_seg"]).fit(no_masks, device="cpu")


def test_contrastive_seg_baseline_and_segmentation_output(tiles: ImageSet, unseen: ImageSet) -> None:
    baseline = ContrastiveSegAssessor({**TINY["contrastive_seg"], "contrastive": False, "epochs": 1})
    baseline.fit(tiles, device="cpu")
    assert "train_contrastive" not in baseline.runtime["history"][0]
    masks = baseline.segment(unseen.images)
    assert [m.shape for m in masks] == [im.shape for im in unseen.images] and masks[0].dtype == bool
    with pytest.raises(ValueError, match="multiples"):
        ContrastiveSegAssessor({"image_size": 100})


def test_contrastive_seg_keeps_the_frozen_imagenet_layers(fitted) -> None:
    assessor = fitted("contrastive_seg")
    assert assessor.s.encoder == "effnet_lite0" and assessor.s.freeze == 2
    imagenet = assessor.build_network(pretrained=True).encoder.backbone.net
    trained = assessor.net.encoder.backbone.net
    # the stem and the first `freeze` stages keep their ImageNet weights and statistics; later stages learn
    torch.testing.assert_close(trained._conv_stem.weight, imagenet._conv_stem.weight)
    torch.testing.assert_close(trained._bn0.running_mean, imagenet._bn0.running_mean)
    assert not torch.equal(trained._blocks[-1]._project_conv.weight, imagenet._blocks[-1]._project_conv.weight)
    with pytest.raises(ValueError, match="multiples of 32"):
        ContrastiveSegAssessor({"encoder": "effnet_lite0", "image_size": 48})


def test_contrastive_seg_encoder_learning_rate_share(tiles: ImageSet) -> None:
    assessor = ContrastiveSegAssessor({**TINY["contrastive_seg"], "epochs": 1, "encoder_lr": 1e-4})
    assessor.fit(tiles, device="cpu")
    imagenet = assessor.build_network(pretrained=True)
    # Adam moves each weight by about its group's rate a step: 2e-7 for the encoder, 2e-3 for the decoder
    trained, start = (n.encoder.backbone.net._blocks[-1]._project_conv.weight for n in (assessor.net, imagenet))
    assert 0 < (trained - start).abs().max() < 1e-5
    assert not torch.allclose(assessor.net.head.bias, imagenet.head.bias, atol=1e-4)


def test_contrastive_seg_keeps_the_moving_average_of_its_weights(tiles: ImageSet) -> None:
    """With a decay near 1 the average hardly leaves the starting weights, while the raw weights move: the
    kept network must be the average, batch-norm statistics included."""
    settings = {**TINY["contrastive_seg"], "epochs": 2, "tune_threshold": False}
    raw, averaged = ContrastiveSegAssessor(settings), ContrastiveSegAssessor({**settings, "ema": 0.9999})
    for assessor in (raw, averaged):
        assessor.fit(tiles, device="cpu")
    seed_everything(3)  # the fit's own start: the same seed gives the same initialization of decoder and head
    start = averaged.build_network(pretrained=True).state_dict()

    def moved(assessor: ContrastiveSegAssessor, key: str) -> float:
        return float((assessor.net.state_dict()[key].float() - start[key].float()).abs().max())

    for key in ("head.weight", "encoder.backbone.net._blocks.6._bn2.running_mean"):
        assert moved(averaged, key) < 0.01 * moved(raw, key), key
    assert averaged.runtime["best_epoch"] >= 1


def test_contrastive_seg_members_of_the_largest_seed_have_seeds_of_their_own() -> None:
    top = 2**63 - 1  # the settings' largest seed: member k's seed + k wraps round instead of failing validation
    pair = ContrastiveSegAssessor({"members": 2, "seed": top})
    assert [pair._member(k).s.seed for k in (0, 1)] == [top, 0]


def test_contrastive_seg_members_are_their_seeds_averaged(
    fitted, tiles: ImageSet, unseen: ImageSet, tmp_path: Path
) -> None:
    """``members=2`` segments with the mean of the maps of two one-network assessors of seeds 3 and 4, each fitted
    as it is alone (what ``bench/tile_grid.py --average`` measured), and saves and loads as one model."""
    settings = {**TINY["contrastive_seg"], "epochs": 1}
    pair = ContrastiveSegAssessor({**settings, "members": 2})
    pair.fit(tiles, device="cpu")
    alone = [ContrastiveSegAssessor({**settings, "seed": seed}) for seed in (3, 4)]
    for assessor in alone:
        assessor.fit(tiles, device="cpu")
    images = list(unseen.images)
    maps = [np.stack(a.probability_maps(images, original_size=False)) for a in alone]
    assert np.abs(maps[0] - maps[1]).max() > 1e-3  # two seeds, two networks
    got = np.stack(pair.probability_maps(images, original_size=False))
    np.testing.assert_allclose(got, (maps[0] + maps[1]) / 2, atol=1e-5)
    assert pair.pixel_threshold == pytest.approx(np.mean([a.pixel_threshold for a in alone]))
    assert pair.threshold == pytest.approx(np.mean([a.threshold for a in alone]))
    assert len(pair.metrics["validation"]["members"]) == 2 and len(pair.runtime["members"]) == 2

    manifest = pair.save(tmp_path / "pair")
    assert manifest.settings["members"] == 2
    again = ContrastiveSegAssessor.load(tmp_path / "pair")
    batch = coil_batch([[im] for im in images])
    np.testing.assert_array_equal(pair.predict(batch)[0], again.predict(batch)[0])

    # ReTrain warm-starts member by member, or every member from a one-network champion; not across counts
    assert ContrastiveSegAssessor({**settings, "members": 2}).fit(tiles, init=pair, device="cpu").epochs_run >= 2
    ContrastiveSegAssessor({**settings, "members": 2}).fit(tiles, init=fitted("contrastive_seg"), device="cpu")
    with pytest.raises(TypeError, match="warm-start"):
        ContrastiveSegAssessor(settings).fit(tiles, init=pair, device="cpu")


def test_contrastive_seg_flip_average_is_flip_equivariant(fitted, unseen: ImageSet) -> None:
    assessor = fitted("contrastive_seg")
    image = unseen.images[-1]
    plain = assessor.probability_maps([image, image[::-1, ::-1]], original_size=False)
    assert not np.allclose(plain[0][::-1, ::-1], plain[1], atol=1e-6)  # one view is not symmetric
    averaged = ContrastiveSegAssessor({**assessor.settings.model_dump(), "flip_average": True})
    averaged.net = assessor.net
    a, b = averaged.probability_maps([image, image[::-1, ::-1]], original_size=False)
    np.testing.assert_allclose(a[::-1, ::-1], b, atol=1e-5)  # the four views of both are the same four


def test_contrastive_seg_on_the_papers_encoder(tiles: ImageSet, unseen: ImageSet, tmp_path: Path) -> None:
    assessor = ContrastiveSegAssessor({**TINY["contrastive_seg"], "encoder": "residual_se", "epochs": 1})
    assessor.fit(tiles, device="cpu")
    assert assessor.runtime["start"] == "scratch" and not hasattr(assessor.net.encoder, "backbone")
    batch = coil_batch([[im] for im in unseen.images])
    p, _ = assessor.predict(batch)
    assessor.save(tmp_path)
    np.testing.assert_array_equal(p, ContrastiveSegAssessor.load(tmp_path).predict(batch)[0])


def test_contrastive_seg_augmentation_keeps_image_and_mask_aligned() -> None:
    assessor = ContrastiveSegAssessor({"image_size": 64, "zoom": 0.4, "jitter": 0.0})
    rng = np.random.default_rng(5)
    mask = np.zeros((64, 64), np.float32)
    mask[10:30, 35:60] = 1
    for _ in range(20):
        x, y = assessor._augment(mask * 3.0 - 1.0, mask, rng)  # standardized values: outside [0, 1]
        assert x.shape == y.shape == (64, 64) and x.max() > 1.5 and x.min() < -0.5
        assert np.mean((x > 0.5) == (y > 0.5)) > 0.97  # the image's bright square is where the mask is


def two_shots_of_each(tiles: ImageSet) -> ImageSet:
    """Each tile photographed twice: the second shot brighter, with a little sensor noise of its own."""
    rng = np.random.default_rng(4)
    images = [
        im
        for image in tiles.images
        for im in (image, (1.1 * image + 0.02 + 0.003 * rng.standard_normal(image.shape)).clip(0, 1).astype(np.float32))
    ]
    masks = [m for mask in tiles.masks for m in (mask, mask)]
    names = [f"{n}{shot}" for n in tiles.names for shot in "ab"]
    return ImageSet(images, np.repeat(tiles.labels, 2), tiles.classes, masks, names, dict(tiles.meta))


def test_near_copies_are_grouped_and_held_out_whole(tiles: ImageSet) -> None:
    shots = two_shots_of_each(tiles)
    groups = near_copy_groups(shots.images)
    assert groups.max() + 1 == len(tiles)  # one group per tile, however bright the shot
    assert np.array_equal(groups[0::2], groups[1::2])
    kept, out = group_holdout(groups, 0.3, np.random.default_rng(0))
    assert len(out) == 12 and len(kept) + len(out) == len(shots)  # 30 % of 40 shots: 6 whole tiles
    assert not set(groups[kept]) & set(groups[out])
    one = np.zeros(4, np.int64)
    assert len(group_holdout(one, 0.3, np.random.default_rng(0))[1]) == 4  # a single group: nothing to keep


def test_contrastive_seg_validates_on_tiles_it_has_not_seen(tiles: ImageSet) -> None:
    shots = two_shots_of_each(tiles)
    for val_split, together in (("near_copies", True), ("images", False)):
        assessor = ContrastiveSegAssessor({**TINY["contrastive_seg"], "epochs": 1, "val_split": val_split})
        assessor.fit(shots, device="cpu")
        held_out = set(assessor.training_data["validation_images"])
        pairs = {name[:-1] for name in held_out}
        assert held_out and (held_out == {p + s for p in pairs for s in "ab"}) is together


def test_contrastive_seg_keep_aspect_sees_every_shot_at_one_scale(tiles: ImageSet, tmp_path: Path) -> None:
    # shots three times as wide as tall: the tile repeated across
    wide = ImageSet([np.tile(im, (1, 3)) for im in tiles.images], tiles.labels, tiles.classes,
                    [np.tile(m, (1, 3)) for m in tiles.masks])  # fmt: skip
    assessor = ContrastiveSegAssessor({**TINY["contrastive_seg"], "epochs": 1, "keep_aspect": True})
    assessor.fit(wide, device="cpu")
    assert assessor.model_shape((40, 120)) == (32, 96) and assessor.model_shape((120, 40)) == (96, 32)
    # a 16 × 250,000 strip (a few kB as a PNG) became 32 × 500,000: 15,000 squares; now at most eight
    assert assessor.model_shape((16, 250_000)) == (32, 8 * 32) and assessor.model_shape((1, 4_000_000))[1] == 8 * 32
    disc = np.zeros((40, 120), bool)
    disc[10:30, 50:70] = True
    side = assessor.model_shape(disc.shape)
    scaled = resize_mask(disc, side)
    assert np.ptp(np.nonzero(scaled)[0]) == np.ptp(np.nonzero(scaled)[1])  # a square stays square
    # the map of a wide image is the network's on each square; where one square alone covers, exactly that
    image = wide.images[0]
    x = assessor._inputs([image])[0]
    stitched = assessor._maps(assessor.net, np.array([x]), torch.device("cpu"))[0]
    first = assessor._probabilities(assessor.net, x[None, :, :32], torch.device("cpu"))[0]
    assert stitched.shape == x.shape and x.shape[0] == 32 and x.shape[1] > 64
    np.testing.assert_allclose(stitched[:, :8], first[:, :8], atol=1e-6)  # the next square starts 10+ px on
    masks = assessor.segment(wide.images)
    assert [m.shape for m in masks] == [im.shape for im in wide.images]
    batch = coil_batch([[im] for im in wide.images])
    p, _ = assessor.predict(batch)
    assessor.save(tmp_path)
    np.testing.assert_array_equal(p, ContrastiveSegAssessor.load(tmp_path).predict(batch)[0])
    with pytest.raises(ValueError, match="crop_size"):
        ContrastiveSegAssessor({"keep_aspect": True, "crop_size": 64})


def test_contrastive_seg_aspect_limit_keeps_only_the_long_shots(tiles: ImageSet, tmp_path: Path) -> None:
    # every other shot three times as wide as tall (over 1.8:1), the rest as they are (at most 1.6:1)
    images = [np.tile(im, (1, 3)) if k % 2 else im for k, im in enumerate(tiles.images)]
    masks = [np.tile(m, (1, 3)) if k % 2 else m for k, m in enumerate(tiles.masks)]
    mixed = ImageSet(images, tiles.labels, tiles.classes, masks)
    settings = {**TINY["contrastive_seg"], "epochs": 1, "keep_aspect": True, "aspect_limit": 1.8}
    assessor = ContrastiveSegAssessor(settings)
    assessor.fit(mixed, device="cpu")
    assert assessor.model_shape((40, 60)) == (32, 32) and assessor.model_shape((60, 40)) == (32, 32)  # squashed
    assert assessor.model_shape((40, 120)) == (32, 96)  # kept
    x = assessor._inputs(images[:2])
    assert x[0].shape == (32, 32) and x[1].shape == assessor.model_shape(images[1].shape) and x[1].shape[1] > 56
    maps = assessor._maps(assessor.net, x, torch.device("cpu"))
    # a squashed shot's map is the network's on the whole square, as without keep_aspect
    alone = assessor._probabilities(assessor.net, x[0][None], torch.device("cpu"))[0]
    np.testing.assert_allclose(maps[0], alone, atol=1e-6)
    assert maps[1].shape == x[1].shape
    batch = coil_batch([[im] for im in images])
    p, _ = assessor.predict(batch)
    assessor.save(tmp_path)
    np.testing.assert_array_equal(p, ContrastiveSegAssessor.load(tmp_path).predict(batch)[0])
    with pytest.raises(ValueError, match="aspect_limit"):
        ContrastiveSegAssessor({"keep_aspect": True, "aspect_limit": 0.5})


def test_contrastive_seg_aspect_defect_share_centres_the_squares_on_defects() -> None:
    # a shot four times as wide as tall, one small defect near its left end
    x = np.random.default_rng(0).normal(size=(3, 32, 128)).astype(np.float32)
    y = np.zeros_like(x)
    y[:, 14:18, 4:8] = 1
    assessors = {
        share: ContrastiveSegAssessor({**TINY["contrastive_seg"], "keep_aspect": True, "aspect_defect_share": share})
        for share in (1.0, 0.0)
    }
    for share, always in ((1.0, True), (0.0, False)):
        rng = np.random.default_rng(1)
        seen = [assessors[share]._crops(x, y, rng)[1].sum(dim=(1, 2, 3)) > 0 for _ in range(20)]
        assert bool(torch.cat(seen).all()) is always  # at random, 8 of the 97 offsets hold the defect
    # a shot squashed square has no room: the setting changes nothing there, not even the random draws
    square, mask = x[:, :, :32].copy(), y[:, :, :32].copy()
    crops = [assessors[share]._crops(square, mask, np.random.default_rng(2)) for share in (1.0, 0.0)]
    for a, b in zip(*crops, strict=True):
        torch.testing.assert_close(a, b)


def test_losses_reward_the_right_answers() -> None:
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:8, 4:8] = 1
    right, wrong = (target * 20 - 10), (10 - target * 20)
    assert combo_loss(right, target) < 0.05 < combo_loss(wrong, target)
    separated = torch.nn.functional.normalize(torch.cat([target, 1 - target], 1) + 0.01, dim=1)
    mixed = torch.nn.functional.normalize(torch.ones(2, 2, 16, 16) + 0.01 * torch.randn(2, 2, 16, 16), dim=1)
    assert proposal_contrastive_loss(separated, target) < proposal_contrastive_loss(mixed, target)
    x = torch.rand(1, 1, 32, 32)
    assert float(dssim_loss(x, x)) < 1e-6 and float(residual_map(x, x).max()) < 1e-5
    assert float(residual_map(x, 1 - x).mean()) > 0.5


def test_load_folder_pairs_images_with_masks(tmp_path: Path) -> None:
    for cls, n in (("good", 2), ("scratch", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(np.full((20, 30), 100 + i, np.uint8)).save(tmp_path / cls / f"{cls}_{i}.jpg")
            if cls == "scratch":
                mask = np.zeros((20, 30), np.uint8)
                mask[5:10, 5:15] = 255
                Image.fromarray(mask).save(tmp_path / cls / f"{cls}_{i}.png")
    images = load_folder(tmp_path)
    assert images.classes == ["good", "scratch"] and len(images) == 5 and list(images.nok) == [0, 0, 1, 1, 1]
    assert images.masks is not None and not images.masks[0].any() and images.masks[2].sum() == 50
    assert images.images[0].dtype == np.float32 and 0 <= images.images[0].min() <= images.images[0].max() <= 1
    small = load_folder(tmp_path, size=(10, 15))
    assert small.images[3].shape == (10, 15) and small.masks[3].sum() == pytest.approx(12, abs=6)
    before = (images.meta["sha256"], image_set_summary(images)["content_sha256"])
    mask = np.zeros((20, 30), np.uint8)
    mask[5:12, 5:15] = 255  # re-annotated: the same images, another mask to learn from
    Image.fromarray(mask).save(tmp_path / "scratch" / "scratch_1.png")
    again = load_folder(tmp_path)
    after = (again.meta["sha256"], image_set_summary(again)["content_sha256"])
    assert before[0] != after[0] and before[1] != after[1]  # a manifest tells the two training sets apart
    # two few-shot draws of one folder: each its own digest, the folder's under subset_of (was: the folder's digest
    # for both, as if they were the same data)
    first, second = (image_set_summary(again.subset(i)) for i in ([0, 2], [1, 3]))
    assert first["content_sha256"] != second["content_sha256"] and first["sha256"] is None
    assert first["subset_of"] == {"sha256": after[0], "counts": {"good": 2, "scratch": 3}, "n_images": 5}
    (tmp_path / "scratch" / "scratch_0.png").unlink()  # a defect image without a mask: no masks at all
    assert load_folder(tmp_path).masks is None


@pytest.mark.datasets
def test_the_magnetic_tile_set_loads_with_masks() -> None:
    if not TILE.is_dir():
        pytest.skip(f"the magnetic-tile set is not at {TILE} (../shared/datasets beside the checkout)")
    images = load_magnetic_tile(TILE, size=64, classes=(CLASSES[0], "MT_Fray"))
    assert images.classes == ["MT_Free", "MT_Fray"] and images.masks is not None
    assert images.nok.sum() == np.sum(images.labels == 1) > 0
    assert all(im.shape == (64, 64) for im in images.images)
    assert any(m.any() for m, y in zip(images.masks, images.nok, strict=True) if y)
    assert not any(m.any() for m, y in zip(images.masks, images.nok, strict=True) if not y)


@pytest.mark.datasets
def test_both_assessors_run_on_real_tiles(tmp_path: Path) -> None:
    if not TILE.is_dir():
        pytest.skip(f"the magnetic-tile set is not at {TILE} (../shared/datasets beside the checkout)")
    images = load_magnetic_tile(TILE, classes=("MT_Free", "MT_Fray"))
    images = images.subset(np.r_[np.arange(12), np.flatnonzero(images.nok)[:8]])
    for key in TINY:
        assessor = CLASSES_BY_KEY[key]({**TINY[key], "epochs": 1})
        assessor.fit(images, device="cpu")
        p, _ = assessor.predict(coil_batch([[im] for im in images.images[-3:]] + [[]]))
        assert np.isfinite(p[:3]).all() and np.isnan(p[3])
