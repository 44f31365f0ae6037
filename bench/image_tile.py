"""Magnetic-tile defects: ``contrastive_seg`` segmentation (with and without its contrastive branch) and the
``ssim_ae`` anomaly model (latent 100/300/500 × SSIM window 7/11/15), beside the two papers' figures.

(a) Segmentation of the defect images: one fixed seeded 70/30 split of the 187 defect images (seed 0);
pooled pixel IoU, Dice, precision and recall on the test 30 % at each image's own resolution (the
paper's confusion matrix is pooled), plus the per-image mean IoU. Paper (its own defect set): 0.66 / 0.77
/ 0.78 / 0.81 with the contrastive branch, 0.21 / 0.31 / 0.67 / 0.21 without.
(b) Anomaly detection: the autoencoder trains on 70 % of ``MT_Free`` only (the defect images of the
segmentation training split only calibrate its thresholds); tested on the other 30 % of ``MT_Free``
and the test defect images: pixel-level ROC-AUC over the test defect images' pixels, image-level ROC-AUC
defect vs free. Paper's best (MVTec AD grid): pixel ROC-AUC 0.9397.
(c) Training time of each model on this machine's CPU.

    .venv/bin/python bench/image_tile.py --threads 2   # the full run (about an hour and a quarter on 2 CPU cores)
    .venv/bin/python bench/image_tile.py --quick    # small images, a few epochs (under 3 minutes)
    .venv/bin/python bench/image_tile.py --threads 2 --parts seg --seed 1   # segmentation only, another seed (40 min)
    .venv/bin/python bench/image_tile.py --threads 2 --parts seg --encoder residual_se   # the paper's encoder
    .venv/bin/python bench/image_tile.py --threads 2 --parts seg --seg image_size=128   # one segmenter setting changed
    .venv/bin/python bench/image_tile.py --threads 2 --parts seg --branch with --seg width=32   # one variant only
    .venv/bin/python bench/image_tile.py --threads 2 --parts ae --ae epochs=120   # one autoencoder setting changed
    .venv/bin/python bench/image_tile.py --threads 2 --parts ae --latents 100 --ae image_size=256 patches_per_image=4 \
        blur=6   # one latent only: Bergmann's patches of a larger image
    .venv/bin/python bench/image_tile.py --threads 2 --parts seg --branch with --split grouped --split-seed 1 \
        --seg val_split=near_copies tune_threshold=true keep_aspect=true   # unseen tiles; the 2026-12-03 evening runs
    .venv/bin/python bench/image_tile.py --threads 2 --parts seg --branch with --split grouped --split-seed 1 \
        --seg val_split=near_copies tune_threshold=true keep_aspect=true aspect_limit=1.8   # only wide shots kept
    .venv/bin/python bench/image_tile.py --threads 2 --parts seg --branch with --split grouped --split-seed 1 \
        --seg val_split=near_copies tune_threshold=true keep_aspect=true aspect_defect_share=0.7   # squares on defects
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from rich.console import Console
from sklearn.metrics import roc_auc_score

from bench.common import add_threads_option, cpu_threads_note, provenance, threads_label
from ml.assessors.base import calibrate
from ml.assessors.contrastive_seg import ContrastiveSegAssessor
from ml.assessors.contrastive_seg.assessor import segmentation_metrics
from ml.assessors.contrastive_seg.torch_model import Encoder
from ml.assessors.ssim_ae import SsimAeAssessor
from ml.assessors.ssim_ae.loss import residual_map
from ml.evaluation.metrics import binary_metrics
from ml.imagesets.base import ImageSet
from ml.imagesets.folder import resize_image, resize_mask
from ml.imagesets.magnetic_tile import load_magnetic_tile
from ml.imagesets.near_copies import near_copy_groups
from ml.training.runtime import resolve_device
from services.cli.models import parse_setting
from services.progress import fit_progress

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SEED = 0
TRAIN_SHARE = 0.7
STDERR = Console(stderr=True)  # the bars; the report goes to stdout
PAPER_SEG = {True: (0.66, 0.77, 0.78, 0.81), False: (0.21, 0.31, 0.67, 0.21)}
PAPER_AE = 0.9397
SWEEP = (0.2, 0.3, 0.4, 0.5, 0.6)  # pixel thresholds the report reads the test IoU at (a diagnostic, not a choice)
BRANCHES = {"both": (True, False), "with": (True,), "without": (False,)}  # --branch: the segmenter variants


@dataclass(frozen=True)
class Plan:
    seg: dict
    ae: dict
    latents: tuple[int, ...]
    windows: tuple[int, ...]
    note: str
    threads: int = 1  # torch CPU threads, set by the command line
    model_seed: int = SEED  # the models' seed (validation split, initialization)
    split_seed: int = SEED  # the test split's (0 in every figure recorded before 2026-12-03 noon)
    branches: tuple[bool, ...] = (True, False)  # the segmenter with its contrastive branch, without, or both
    limit: int | None = None  # images per split and class group (quick mode)
    grouped: bool = False  # the shots of one tile on one side of the split (see ``split``)
    device: str = "cpu"  # where the models train: "cpu" for every figure recorded so far, or "cuda" / "auto"
    extra: dict = field(default_factory=dict)


FULL = Plan(
    seg={"encoder": "effnet_lite0", "width": 16, "image_size": 192, "crop_size": 0, "batch_size": 8, "lr": 2e-3,
         "epochs": 80, "patience": 80, "min_object_px": 12, "encoder_lr": 0.1, "tune_threshold": False},
    ae={"lr": 2e-4, "epochs": 200, "patience": 200, "blur": 3.0},
    latents=(100, 300, 500),
    windows=(7, 11, 15),
    # the figures in braces come from the settings actually run (see ``run``), so an override cannot leave
    # the description behind
    note="segmenter with EfficientNet-Lite0's ImageNet-pretrained encoder (stem and first two stages frozen; the "
    "paper trains its own residual-SE encoder from scratch: `--encoder residual_se`), decoder width {seg[width]} "
    "(paper: 32), on whole images resized to {seg[image_size]} × {seg[image_size]}, {seg[epochs]} epochs (the best "
    "on validation kept), the encoder at {seg[encoder_lr]:g} of the decoder's learning rate, {threshold}; "
    "autoencoder on whole tiles resized to {ae[image_size]} × {ae[image_size]} and smoothed with a Gaussian of "
    "σ = {ae[blur]:g} pixels, {ae[epochs]} epochs at Adam "
    "{ae[lr]:g} (Bergmann: 16 crops per image, 200 epochs at 2e-4); all of it to fit in about an hour and a "
    "quarter of two CPU threads",
)  # fmt: skip
QUICK = Plan(
    seg={"encoder": "effnet_lite0", "width": 4, "image_size": 32, "crop_size": 0, "batch_size": 8, "lr": 2e-3,
         "epochs": 3, "proj_dim": 16, "min_object_px": 1},
    ae={"lr": 1e-3, "epochs": 2, "width": 8, "blur": 1.0},
    latents=(100,),
    windows=(7, 11, 15),
    limit=40,
    note="quick mode: 40 images per group, tiny networks, a few epochs — a smoke test, not a measurement",
)  # fmt: skip


def split(
    images: ImageSet, limit: int | None, grouped: bool = False, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded 70/30 splits of the defect images and of the defect-free ones: (defect train, defect test,
    free train, free test).

    Image by image (the figures recorded before 2026-12-03), or ``grouped``: the set holds several shots of one
    physical tile, and an image-by-image split puts near-copies of training tiles into the test set
    (`bench/tile_overlap.py`); grouped, the shots of one tile (near-copies, joined transitively) stay together."""
    rng = np.random.default_rng(seed)
    nok = images.nok.astype(bool)
    parts = []
    for index in (np.flatnonzero(nok), np.flatnonzero(~nok)):
        if grouped:
            groups = near_copy_groups(images.images, index)
            order = np.concatenate([index[groups == g] for g in rng.permutation(groups.max() + 1)])
        else:
            order = rng.permutation(index)
        if limit:
            order = order[:limit]
        n_train = int(TRAIN_SHARE * len(order))
        if grouped:  # whole groups: the train part ends where a group ends
            ends = np.flatnonzero(np.diff(groups[np.searchsorted(index, order)]) != 0) + 1
            n_train = int(ends[ends >= n_train][0]) if np.any(ends >= n_train) else len(order)
        parts += [order[:n_train], order[n_train:]]
    return parts[0], parts[1], parts[2], parts[3]


def run_segmentation(tiles: ImageSet, train: np.ndarray, test: np.ndarray, plan: Plan) -> dict:
    results = {}
    test_images = [tiles.images[i] for i in test]
    test_masks = [tiles.masks[i] for i in test]  # type: ignore[index]
    for contrastive in plan.branches:
        assessor = ContrastiveSegAssessor({**plan.seg, "contrastive": contrastive, "seed": plan.model_seed})
        t = time.perf_counter()
        with fit_progress(f"contrastive_seg contrastive={contrastive}", assessor.s.epochs, STDERR) as on_epoch:
            assessor.fit(tiles.subset(train), device=plan.device, callback=on_epoch)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        maps = assessor.probability_maps(test_images)
        predicted = assessor.masks(maps, test_images)
        predict_ms = 1000 * (time.perf_counter() - t) / len(test)
        metrics = mask_figures(tiles, test, test_masks, predicted)
        results[contrastive] = {
            **metrics,
            "fit_s": fit_s,
            "predict_ms": predict_ms,
            "epochs": assessor.runtime["epochs_run"],
            "best_epoch": assessor.runtime["best_epoch"],
            "pixel_threshold": assessor.pixel_threshold,
            "val_images": assessor.training_data["n_val"],
            "sweep": {t: segmentation_metrics(test_masks, assessor.masks(maps, test_images, t)) for t in SWEEP},
            "maps": maps,  # p(defect) per test pixel, for bench/tile_grid.py's average over model seeds
        }
        print(f"contrastive_seg contrastive={contrastive}: IoU {metrics['iou']:.3f}", file=sys.stderr, flush=True)
    results["round trip"] = round_trip(tiles, test, ContrastiveSegAssessor(plan.seg).model_shape)
    return results


def mask_figures(tiles: ImageSet, test: np.ndarray, truth: list[np.ndarray], predicted: list[np.ndarray]) -> dict:
    """Pooled figures of predicted masks, and the IoU of each defect class's images alone (pooled, the figure
    is mostly ``MT_Uneven``)."""
    return {
        **segmentation_metrics(truth, predicted),
        "iou_by_class": by_class(
            tiles, test, lambda k: segmentation_metrics([truth[i] for i in k], [predicted[i] for i in k])["iou"]
        ),
    }


def round_trip(tiles: ImageSet, test: np.ndarray, model_shape: Callable[[tuple[int, ...]], tuple[int, int]]) -> dict:
    """IoU of the true masks after the segmenter's resize to ``model_shape`` and back (its own resampling): the
    most any model working at that size could score, so a low class IoU can be told apart from lost resolution."""
    truth = [tiles.masks[i] for i in test]  # type: ignore[index]
    back = [resize_image(resize_mask(m, model_shape(m.shape)).astype(np.float32), m.shape) >= 0.5 for m in truth]
    figures = mask_figures(tiles, test, truth, back)
    return {"iou": figures["iou"], "iou_by_class": figures["iou_by_class"]}


def run_anomaly(tiles: ImageSet, parts: tuple[np.ndarray, ...], plan: Plan) -> dict:
    defect_train, defect_test, free_train, free_test = parts
    test = np.r_[free_test, defect_test]
    y = tiles.nok[test].astype(int)
    results = {}
    for latent in plan.latents:
        assessor = SsimAeAssessor({**plan.ae, "latent_dim": latent, "seed": plan.model_seed})
        t = time.perf_counter()
        with fit_progress(f"ssim_ae latent {latent}", assessor.s.epochs, STDERR) as on_epoch:
            assessor.fit(tiles.subset(np.r_[free_train, defect_train]), device=plan.device, callback=on_epoch)
        fit_s = time.perf_counter() - t
        prepared = [torch.from_numpy(assessor.prepare(tiles.images[i]))[None, None] for i in test]
        t = time.perf_counter()
        recon = [torch.from_numpy(assessor.reconstruct(tiles.images[i]))[None, None] for i in test]
        predict_ms = 1000 * (time.perf_counter() - t) / len(test)
        for window in plan.windows:
            maps = [residual_map(x, r, window)[0, 0].numpy() for x, r in zip(prepared, recon, strict=True)]
            scores = np.array([assessor._image_score(m) for m in maps])
            truth = [tiles.masks[i].ravel() for i in defect_test]  # type: ignore[index]
            pixels = [resize_image(maps[k], tiles.images[i].shape).ravel() for k, i in enumerate(test) if y[k]]
            row = {
                "pixel_auc": float(roc_auc_score(np.concatenate(truth), np.concatenate(pixels))),
                "pixel_auc_by_class": by_class(
                    tiles,
                    defect_test,
                    lambda k, t=truth, p=pixels: float(
                        roc_auc_score(np.concatenate([t[i] for i in k]), np.concatenate([p[i] for i in k]))
                    ),
                ),
                "image_auc": float(roc_auc_score(y, scores)),
                "fit_s": fit_s,
                "predict_ms": predict_ms,
                "epochs": assessor.runtime["epochs_run"],
                "reconstruction": {k: assessor.metrics["validation"][k] for k in ("dssim", "mean_image_dssim")},
            }
            if window == assessor.s.window:  # the assessor's own calibrated decision
                row["decision"] = binary_metrics(y, calibrate(scores, assessor.threshold))
            results[(latent, window)] = row
            print(f"ssim_ae latent {latent} window {window}: {row['pixel_auc']:.3f}", file=sys.stderr, flush=True)
    return results


def by_class(tiles: ImageSet, index: np.ndarray, metric) -> dict[str, float]:
    """``metric`` of each defect class's images alone; ``metric`` takes positions into ``index``.

    The pooled figures are mostly ``MT_Uneven`` (about 70 % of the defect pixels): this shows what the
    pooled number hides."""
    labels = tiles.labels[index]
    out = {}
    for label in np.unique(labels):
        name = tiles.classes[label]
        if name != "MT_Free":
            out[name] = metric(np.flatnonzero(labels == label))
    return out


def make_plan(
    quick: bool = False,
    threads: int = 1,
    seed: int = SEED,
    encoder: str = "effnet_lite0",
    seg_settings: dict | None = None,
    ae_settings: dict | None = None,
    branch: str = "both",
    grouped: bool = False,
    split_seed: int = SEED,
    latents: tuple[int, ...] | None = None,
    device: str = "cpu",
) -> Plan:
    """The plan with the command line's changes, its note saying what they replaced (see :func:`run` for what
    each option means)."""
    torch.set_num_threads(threads)
    plan = QUICK if quick else FULL
    if latents:
        plan = replace(plan, latents=tuple(latents))
    replaced = []
    for part, name, changes in (("seg", "segmenter", {"encoder": encoder, **(seg_settings or {})}),
                                ("ae", "autoencoder", ae_settings or {})):  # fmt: skip
        current = getattr(plan, part)
        changed = {k: v for k, v in changes.items() if current.get(k) != v}
        if changed:
            replaced.append(f"{name} settings {changed} replace the plan's")
            plan = replace(plan, **{part: {**current, **changed}})
    seg = ContrastiveSegAssessor.Settings(**plan.seg).model_dump()
    ae = SsimAeAssessor.Settings(**plan.ae).model_dump()
    threshold = (
        "the pixel threshold tuned on the validation images that also pick the epoch"
        if seg["tune_threshold"]
        else f"pixel threshold {seg['pixel_threshold']:g} (not tuned on the validation images, "
        f"{seg['val_fraction']:.0%} of the training images, that also pick the epoch)"
    )
    plan = replace(plan, note="; ".join([*replaced, plan.note.format(seg=seg, ae=ae, threshold=threshold)]))
    return replace(
        plan,
        threads=threads,
        model_seed=seed,
        branches=BRANCHES[branch],
        grouped=grouped,
        split_seed=split_seed,
        device=str(resolve_device(device)),
    )


def device_note(plan: Plan) -> str:
    """Where the training times come from."""
    if plan.device == "cpu":
        return cpu_threads_note(plan.threads)
    return f"Trained on {torch.cuda.get_device_name(torch.device(plan.device))} ({plan.device})."


def run(
    quick: bool = False,
    datasets: Path = DATASETS,
    threads: int = 1,
    parts: tuple[str, ...] = ("seg", "ae"),
    **options,
) -> str:
    """Train and test the assessors of ``parts``; the markdown section with the figures.

    ``options`` are :func:`make_plan`'s. ``seed`` changes the models' seed only: another validation split and
    initialization, the same test images; ``split_seed`` draws other test images.
    ``encoder="residual_se"`` trains the segmenter on the paper's own encoder, from scratch; ``seg_settings``
    replace the plan's segmenter settings and ``ae_settings`` the autoencoder's (how the plan's were chosen:
    docs/benchmarks.md); ``branch`` "with" or "without" trains one segmenter variant instead of both, to try
    a setting in half the time; ``latents`` trains only those autoencoders, for the same reason."""
    plan = make_plan(quick, threads, **options)
    started = time.perf_counter()
    tiles = load_magnetic_tile(datasets / "magnetic-tile")
    splits = split(tiles, plan.limit, plan.grouped, plan.split_seed)
    seg = run_segmentation(tiles, splits[0], splits[1], plan) if "seg" in parts else {}
    ae = run_anomaly(tiles, splits, plan) if "ae" in parts else {}
    return report(plan, tiles, splits, seg, ae, time.perf_counter() - started)


def report(plan: Plan, tiles: ImageSet, splits, seg: dict, ae: dict, total_s: float) -> str:
    defect_train, defect_test, free_train, free_test = splits
    lines = [
        "## Magnetic-tile defects: segmentation (contrastive_seg) and anomaly detection (ssim_ae)",
        "",
        provenance(),
        "",
        f"Magnetic-tile development portion: {len(tiles)} images ({int(tiles.nok.sum())} defect, "
        f"{int((tiles.nok == 0).sum())} defect-free). Split seed {plan.split_seed}"
        + (", grouped (the shots of one tile together)" if plan.grouped else ", image by image")
        + f": defect images {len(defect_train)} train / "
        f"{len(defect_test)} test, defect-free {len(free_train)} train / {len(free_test)} test; model seed "
        f"{plan.model_seed}. **Deviations from the papers' protocols: {plan.note}.** " + device_note(plan),
    ]
    if seg:
        lines += segmentation_report(plan, seg)
    if ae:
        lines += anomaly_report(ae)
    lines += [
        "",
        f"### (c) Training time ({'CPU, ' + threads_label(plan.threads) if plan.device == 'cpu' else plan.device})",
        "",
        "| model | settings | epochs run | train s | predict ms/image | validation DSSIM (mean image's) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for contrastive in plan.branches if seg else ():
        r = seg[contrastive]
        lines.append(
            f"| contrastive_seg (contrastive={contrastive}) | {_settings(plan.seg)} | {r['epochs']} "
            f"| {r['fit_s']:.0f} | {r['predict_ms']:.1f} | |"
        )
    for latent in plan.latents if ae else ():
        r = ae[(latent, plan.windows[0])]
        dssim = r["reconstruction"]
        lines.append(
            f"| ssim_ae (latent {latent}) | {_settings(plan.ae)} | {r['epochs']} | {r['fit_s']:.0f} "
            f"| {r['predict_ms']:.1f} | {dssim['dssim']:.3f} ({dssim['mean_image_dssim']:.3f}) |"
        )
    lines += ["", f"Whole run: {total_s / 60:.1f} minutes."]
    return "\n".join(lines)


def segmentation_report(plan: Plan, seg: dict) -> list[str]:
    lines = [
        "",
        "### (a) Segmentation of the test defect images (pooled over all test pixels, at original resolution)",
        "",
        "| model | IoU | Dice | precision | recall | mean IoU per image | paper IoU / Dice / P / R |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    names = {True: "CNN + contrastive (`contrastive_seg`)", False: "CNN baseline (contrastive=False)"}
    for contrastive in plan.branches:
        r = seg[contrastive]
        name = names[contrastive]
        paper = " / ".join(f"{v:.2f}" for v in PAPER_SEG[contrastive])
        lines.append(
            f"| {name} | {r['iou']:.3f} | {r['dice']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['mean_iou']:.3f} | {paper} |"
        )
    classes = seg["round trip"]["iou_by_class"]
    lines += ["", "IoU by defect class (test images of that class alone):", "",
              "| model | " + " | ".join(classes) + " |",
              "|---|" + "---:|" * len(classes)]  # fmt: skip
    rows = [(contrastive, f"contrastive={contrastive}") for contrastive in plan.branches]
    geometry = ""
    if plan.seg.get("keep_aspect"):
        limit = float(plan.seg.get("aspect_limit", 1))
        geometry = "its short side at " if limit <= 1 else f"its short side (over {limit:g}:1) or a square at "
    rows.append(("round trip", f"true masks through {geometry}{plan.seg['image_size']} px and back (upper bound)"))
    for key, name in rows:
        values = " | ".join(f"{v:.3f}" for v in seg[key]["iou_by_class"].values())
        lines.append(f"| {name} | {values} |")
    lines += ["", f"Pooled IoU of the true masks through the resize round trip: {seg['round trip']['iou']:.3f}."]
    lines += sweep_report(plan, seg)
    if True not in seg:
        return lines
    target = seg[True]
    lines += [
        "",
        f"Targets IoU ≥ 0.66, Dice ≥ 0.77: contrastive_seg is at {target['iou']:.3f} ({target['iou'] - 0.66:+.3f}) "
        f"and {target['dice']:.3f} ({target['dice'] - 0.77:+.3f}). The paper's figures are on its own defect set "
        "(not magnetic tile), so they are a reference, not a like-for-like comparison.",
    ]
    return lines


def sweep_report(plan: Plan, seg: dict) -> list[str]:
    """What other pixel thresholds would have given on the test images: read off the test set, so a diagnostic
    of where the model's probabilities sit (is recall lost to the threshold?), never a choice."""
    lines = [
        "",
        "Test IoU / recall at other pixel thresholds (read off the test images: a diagnostic, not a choice):",
        "",
        "| model | validation images | " + " | ".join(f"{t:g}" for t in SWEEP) + " | the model's own threshold |",
        "|---|---:|" + "---:|" * (len(SWEEP) + 1),
    ]
    for contrastive in plan.branches:
        r = seg[contrastive]
        cells = [f"{r['sweep'][t]['iou']:.3f} / {r['sweep'][t]['recall']:.3f}" for t in SWEEP]
        cells.append(f"{r['pixel_threshold']:g}: {r['iou']:.3f} / {r['recall']:.3f}")
        lines.append(f"| contrastive={contrastive} | {r['val_images']} | " + " | ".join(cells) + " |")
    return lines


def anomaly_report(ae: dict) -> list[str]:
    lines = [
        "",
        "### (b) Anomaly detection, trained on defect-free tiles only (test split)",
        "",
        "| latent | SSIM window | pixel ROC-AUC (defect images) | image ROC-AUC (defect vs free) |",
        "|---:|---:|---:|---:|",
    ]
    for (latent, window), r in ae.items():
        lines.append(f"| {latent} | {window} | {r['pixel_auc']:.4f} | {r['image_auc']:.4f} |")
    best_key = max(ae, key=lambda k: ae[k]["pixel_auc"])
    best = ae[best_key]
    lines += [
        "",
        f"Best pixel ROC-AUC {best['pixel_auc']:.4f} (latent {best_key[0]}, window {best_key[1]}); the paper's best "
        f"on MVTec AD grid is {PAPER_AE} and the target 0.94 ({best['pixel_auc'] - 0.94:+.4f}). "
        f"Best image ROC-AUC {max(r['image_auc'] for r in ae.values()):.4f}. Pixel ROC-AUC of that model by defect "
        "class: " + ", ".join(f"{k} {v:.3f}" for k, v in best["pixel_auc_by_class"].items()) + ".",
    ]
    decisions = [(k, r["decision"]) for k, r in ae.items() if "decision" in r]
    if decisions:
        lines += ["", "Image-level decision at each model's own validation threshold (Youden's J, window "
                  f"{decisions[0][0][1]}):", ""]  # fmt: skip
        for (latent, _), d in decisions:
            lines.append(
                f"- latent {latent}: accuracy {d['accuracy']:.3f}, NOK recall {d['recall_nok']:.3f}, "
                f"NOK precision {d['precision_nok']:.3f}, MCC {d['mcc']:.3f}"
            )
    return lines


def _settings(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="cpu (every figure recorded so far), cuda, or auto: the GPU when there is one"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, a few epochs")
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="the shared datasets folder")
    add_threads_option(parser)
    parser.add_argument("--seed", type=int, default=SEED, help="the models' seed (not the test split's)")
    parser.add_argument("--split-seed", type=int, default=SEED, help="the test split's seed (default 0)")
    parser.add_argument("--parts", nargs="+", choices=("seg", "ae"), default=["seg", "ae"],
                        help="segmentation, anomaly detection or both (default)")  # fmt: skip
    parser.add_argument("--encoder", choices=get_args(Encoder), default="effnet_lite0",
                        help="the segmenter's encoder (residual_se: the paper's, from scratch)")  # fmt: skip
    parser.add_argument("--seg", nargs="+", default=[], metavar="KEY=VALUE",
                        help="replace one of the segmenter's settings, e.g. image_size=128 zoom=0.25")  # fmt: skip
    parser.add_argument("--branch", choices=tuple(BRANCHES), default="both",
                        help="the segmenter with its contrastive branch, without it, or both (default)")  # fmt: skip
    parser.add_argument("--ae", nargs="+", default=[], metavar="KEY=VALUE",
                        help="replace one of the autoencoder's settings, e.g. epochs=60 blur=3")  # fmt: skip
    parser.add_argument("--latents", nargs="+", type=int, default=None, metavar="N",
                        help="train only these autoencoder latent sizes (default: the plan's 100 300 500)")  # fmt: skip
    parser.add_argument("--split", choices=("images", "grouped"), default="images",
                        help="image by image (the recorded figures), or the shots of one tile together")  # fmt: skip
    add_device_option(parser)
    args = parser.parse_args()
    parts = tuple(args.parts)
    seg = dict(parse_setting(text) for text in args.seg)
    ae = dict(parse_setting(text) for text in args.ae)
    grouped = args.split == "grouped"
    print(
        run(args.quick, args.datasets, args.threads, parts, seed=args.seed, encoder=args.encoder, seg_settings=seg,
            ae_settings=ae, branch=args.branch, grouped=grouped, split_seed=args.split_seed, latents=args.latents,
            device=args.device)
    )  # fmt: skip


if __name__ == "__main__":
    main()
