"""Magnetic-tile segmentation over several test splits × model seeds: the mean and spread of ``contrastive_seg``.

One split and one model seed move pooled IoU by up to 0.4 and 0.1 (docs/benchmarks.md, the tile section), more
than the margin to the target. So a setting is judged here on the mean over every cell of split seeds × model
seeds, with the spread beside it. On two CPU cores a cell takes 20–35 minutes, which is why the recorded
figures have few cells; on a GPU the same command runs a grid in the time one cell takes here.

    .venv/bin/python bench/tile_grid.py --device auto --split-seeds 0 1 2 --model-seeds 0 1 2   # nine cells
    .venv/bin/python bench/tile_grid.py --device auto --split-seeds 0 1 2 --model-seeds 0 1 \\
        --seg keep_aspect=true aspect_limit=1.8 val_split=near_copies tune_threshold=true   # one setting
    .venv/bin/python bench/tile_grid.py --quick --split-seeds 0 1 --model-seeds 0 1   # a smoke run, minutes
    .venv/bin/python bench/tile_grid.py --threads 2 --split images --split-seeds 0 --model-seeds 0 1 2 3 \\
        --average --maps /tmp/tile-maps   # the paper's split: each seed, and the seeds' maps averaged

``--average`` adds, per split, what the model seeds segment together: their p(defect) maps averaged pixel by
pixel, then thresholded and cleaned as one model's (an ensemble of the seeds), for all of them and for every
pair. ``--maps DIR`` keeps each cell's test maps and figures there as it finishes, and a later run of the same
command takes a cell from there instead of training it again: a grid cut short goes on where it stopped.

Splits are grouped (the shots of one tile on one side) unless ``--split images``. The report goes to stdout,
one row per cell, then the mean and standard deviation, overall and per split.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_threads_option, code_version, cpu_identity, provenance
from bench.image_tile import (
    BRANCHES,
    DATASETS,
    Plan,
    add_device_option,
    device_note,
    make_plan,
    mask_figures,
    run_segmentation,
    split,
)
from ml.assessors.contrastive_seg import ContrastiveSegAssessor
from ml.imagesets.base import ImageSet
from ml.imagesets.magnetic_tile import load_magnetic_tile
from ml.training.runtime import resolve_device
from services.cli.models import parse_setting

METRICS = ("iou", "dice", "precision", "recall")
TARGET = {"iou": 0.66, "dice": 0.77}


def spread(values: list[float]) -> str:
    """Mean ± standard deviation (the deviation only from two values on)."""
    mean = statistics.mean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def run_grid(args: argparse.Namespace) -> str:
    settings = dict(parse_setting(text) for text in args.seg)
    tiles = load_magnetic_tile(args.datasets / "magnetic-tile")
    cells: dict[tuple[int, int, bool], dict] = {}
    averages: dict[tuple[int, bool], dict[str, dict]] = {}
    plan = None
    for split_seed in args.split_seeds:
        plans = [
            make_plan(
                args.quick,
                args.threads,
                model_seed,
                seg_settings=settings,
                branch=args.branch,
                grouped=args.split == "grouped",
                split_seed=split_seed,
                device=args.device,
            )
            for model_seed in args.model_seeds
        ]
        train, test, _, _ = split(tiles, plans[0].limit, plans[0].grouped, split_seed)  # one split, every seed
        for plan in plans:
            kept = {c: load_cell(args.maps, split_seed, plan, c, args) for c in plan.branches} if args.maps else {}
            reused = bool(kept) and all(kept.values())  # else both branches train again, as one run does
            results = kept if reused else run_segmentation(tiles, train, test, plan)
            for contrastive in plan.branches:
                cell = {**results[contrastive], "images": len(test)}
                if args.average or args.maps:
                    # at the precision they are kept at, so that a resumed grid averages what a whole one does
                    cell["maps"] = [m.astype(np.float16).astype(np.float32) for m in cell["maps"]]
                else:
                    del cell["maps"]  # a grid of many cells would hold every cell's maps for nothing
                cells[(split_seed, plan.model_seed, contrastive)] = cell
                if args.maps and not reused:
                    save_cell(args.maps, split_seed, plan, contrastive, args, cell)
                print(
                    f"split {split_seed}, model seed {plan.model_seed}, contrastive={contrastive}: "
                    f"IoU {cell['iou']:.3f}" + (f" (kept from --maps, code {cell['code']})" if reused else ""),
                    file=sys.stderr,
                    flush=True,
                )
        if args.average and len(plans) > 1:
            for contrastive in plans[0].branches:
                members = [cells[(split_seed, p.model_seed, contrastive)] for p in plans]
                averages[(split_seed, contrastive)] = seed_averages(tiles, test, plans[0], members)
    assert plan is not None
    return report(args, plan, cells, averages)


def cell_file(folder: Path, split_seed: int, plan: Plan, contrastive: bool) -> Path:
    return folder / f"split{split_seed}-seed{plan.model_seed}-{'with' if contrastive else 'without'}.npz"


def cell_key(plan: Plan, args: argparse.Namespace) -> str:
    """What a kept cell must have run under to stand for this command's: every segmenter setting, defaults
    included (a default that changed makes another model), the thread count and the processor models (results
    depend on each)."""
    settings = ContrastiveSegAssessor.Settings(**plan.seg).model_dump()
    device = resolve_device(plan.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    where = {"threads": args.threads, "device": plan.device, "cpu": cpu_identity(), "gpu": gpu}
    return json.dumps(
        {"seg": settings, "split": args.split, "quick": args.quick, **where},
        sort_keys=True,
        default=str,
    )


def save_cell(
    folder: Path, split_seed: int, plan: Plan, contrastive: bool, args: argparse.Namespace, cell: dict
) -> None:
    """The cell's test maps (float16: a probability needs no more), figures and code version, with the settings
    they came from."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = {k: v for k, v in cell.items() if k not in ("maps", "sweep")}
    meta = json.dumps({"key": cell_key(plan, args), "cell": {**figures, "code": code_version()}}, default=str)
    maps = [m.astype(np.float16) for m in cell["maps"]]
    np.savez_compressed(cell_file(folder, split_seed, plan, contrastive), *maps, meta=np.array(meta))


def load_cell(folder: Path, split_seed: int, plan: Plan, contrastive: bool, args: argparse.Namespace) -> dict | None:
    """A cell kept by an earlier run of the same command, or None (none kept, or kept under other settings).
    A cell kept under other code but the same settings is reused; the progress line names its code version."""
    path = cell_file(folder, split_seed, plan, contrastive)
    if not path.exists():
        return None
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        if meta["key"] != cell_key(plan, args):
            print(f"{path} was made under other settings: training the cell again", file=sys.stderr)
            return None
        maps = [data[f"arr_{i}"].astype(np.float32) for i in range(len(data.files) - 1)]
    return {**meta["cell"], "maps": maps}


def seed_averages(tiles: ImageSet, test: np.ndarray, plan: Plan, members: list[dict]) -> dict[str, dict]:
    """What the model seeds segment together: their maps averaged pixel by pixel, then thresholded (at their
    mean pixel threshold) and cleaned as one model's maps are. For all of them, and the mean over every pair.
    The members' own mean is recomputed from the same kept-precision maps, so every row compares like with like."""
    images = [tiles.images[i] for i in test]
    truth = [tiles.masks[i] for i in test]  # type: ignore[index]
    assessor = ContrastiveSegAssessor(plan.seg)  # only its post-processing: threshold, small components

    def together(group: tuple[dict, ...]) -> dict:
        maps = [np.mean(np.stack(stack), axis=0) for stack in zip(*(m["maps"] for m in group), strict=True)]
        masks = assessor.masks(maps, images, statistics.mean(m["pixel_threshold"] for m in group))
        return mask_figures(tiles, test, truth, masks)

    out = {f"all {len(members)}": together(tuple(members))}
    if len(members) > 2:
        pairs = [together(pair) for pair in itertools.combinations(members, 2)]
        out[f"mean of the {len(pairs)} pairs"] = mean_figures(pairs)
    out["members' mean (no averaging)"] = mean_figures([together((member,)) for member in members])
    return out


def mean_figures(rows: list[dict]) -> dict:
    """The mean of each figure (and of each class's IoU) over ``rows``: what one of them gives, on average."""
    classes = rows[0]["iou_by_class"]
    return {
        **{m: statistics.mean(r[m] for r in rows) for m in (*METRICS, "mean_iou")},
        "iou_by_class": {c: statistics.mean(r["iou_by_class"][c] for r in rows) for c in classes},
    }


def report(
    args: argparse.Namespace,
    plan,
    cells: dict[tuple[int, int, bool], dict],
    averages: dict[tuple[int, bool], dict[str, dict]],
) -> str:
    lines = [
        "## Magnetic-tile segmentation over test splits × model seeds",
        "",
        provenance(),
        "",
        f"Split: {args.split}, split seeds {' '.join(map(str, args.split_seeds))}; model seeds "
        f"{' '.join(map(str, args.model_seeds))}. Plan: {plan.note}. {device_note(plan)}",
        "",
        "| split seed | model seed | contrastive | test defect images | IoU | Dice | precision | recall "
        "| mean IoU per image | train s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (split_seed, model_seed, contrastive), r in cells.items():
        lines.append(
            f"| {split_seed} | {model_seed} | {contrastive} | {r['images']} | {r['iou']:.3f} | {r['dice']:.3f} "
            f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['mean_iou']:.3f} | {r['fit_s']:.0f} |"
        )
    lines += ["", "| contrastive | over | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for contrastive in plan.branches:
        groups = {"every cell": [r for (_, _, c), r in cells.items() if c == contrastive]}
        for split_seed in args.split_seeds:
            groups[f"split {split_seed}"] = [
                r for (s, _, c), r in cells.items() if c == contrastive and s == split_seed
            ]
        for name, rows in groups.items():
            cols = [spread([r[m] for r in rows]) for m in METRICS]
            lines.append(f"| {contrastive} | {name} ({len(rows)}) | " + " | ".join(cols) + " |")
    for contrastive in plan.branches:
        rows = [r for (_, _, c), r in cells.items() if c == contrastive]
        means = {m: statistics.mean(r[m] for r in rows) for m in TARGET}
        verdict = ", ".join(f"{m} {means[m]:.3f} against {t} ({means[m] - t:+.3f})" for m, t in TARGET.items())
        lines += ["", f"contrastive={contrastive}, mean of {len(rows)} cells: {verdict}."]
    if averages:
        lines += average_report(averages)
    return "\n".join(lines)


def average_report(averages: dict[tuple[int, bool], dict[str, dict]]) -> list[str]:
    classes = list(next(iter(next(iter(averages.values())).values()))["iou_by_class"])
    lines = [
        "",
        "The model seeds' maps averaged (`--average`; an ensemble of the seeds), beside their own mean:",
        "",
        "| split seed | contrastive | maps averaged | IoU | Dice | precision | recall | mean IoU per image | "
        + " | ".join(classes)
        + " |",
        "|---:|---|---|" + "---:|" * (5 + len(classes)),
    ]
    for (split_seed, contrastive), rows in averages.items():
        for name, r in rows.items():
            figures = " | ".join(f"{r[m]:.3f}" for m in (*METRICS, "mean_iou"))
            by_class_iou = " | ".join(f"{r['iou_by_class'][c]:.3f}" for c in classes)
            lines.append(f"| {split_seed} | {contrastive} | {name} | {figures} | {by_class_iou} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small images, a few epochs: a smoke run")
    parser.add_argument("--datasets", type=Path, default=DATASETS, help="the shared datasets folder")
    add_threads_option(parser)
    add_device_option(parser)
    parser.add_argument("--split-seeds", nargs="+", type=int, default=[0, 1, 2], metavar="N")
    parser.add_argument("--model-seeds", nargs="+", type=int, default=[0, 1], metavar="N")
    parser.add_argument("--split", choices=("images", "grouped"), default="grouped",
                        help="the shots of one tile together (default), or image by image")  # fmt: skip
    parser.add_argument("--branch", choices=tuple(BRANCHES), default="with",
                        help="the segmenter with its contrastive branch (default), without it, or both")  # fmt: skip
    parser.add_argument("--seg", nargs="+", default=[], metavar="KEY=VALUE",
                        help="replace one of the segmenter's settings, e.g. keep_aspect=true")  # fmt: skip
    parser.add_argument("--average", action="store_true",
                        help="also the model seeds' maps averaged, per split (an ensemble of the seeds)")  # fmt: skip
    parser.add_argument("--maps", type=Path, default=None, metavar="DIR",
                        help="keep each cell's test maps here; reuse a cell kept there")  # fmt: skip
    args = parser.parse_args()
    if args.average and len(args.model_seeds) < 2:
        parser.error("--average needs two model seeds or more")
    print(run_grid(args))


if __name__ == "__main__":
    main()
