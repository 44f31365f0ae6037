"""Magnetic-tile segmentation over several test splits × model seeds: the mean and spread of ``contrastive_seg``.

One split and one model seed move pooled IoU by up to 0.4 and 0.1 (docs/benchmarks.md, the tile section), more
than the margin to the target. So a setting is judged here on the mean over every cell of split seeds × model
seeds, with the spread beside it. On two CPU cores a cell takes 20–35 minutes, which is why the recorded
figures have few cells; on a GPU the same command runs a grid in the time one cell takes here.

    .venv/bin/python bench/tile_grid.py --device auto --split-seeds 0 1 2 --model-seeds 0 1 2   # nine cells
    .venv/bin/python bench/tile_grid.py --device auto --split-seeds 0 1 2 --model-seeds 0 1 \\
        --seg keep_aspect=true aspect_limit=1.8 val_split=near_copies tune_threshold=true   # one setting
    .venv/bin/python bench/tile_grid.py --quick --split-seeds 0 1 --model-seeds 0 1   # a smoke run, minutes

Splits are grouped (the shots of one tile on one side) unless ``--split images``. The report goes to stdout,
one row per cell, then the mean and standard deviation, overall and per split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_threads_option, provenance
from bench.image_tile import BRANCHES, DATASETS, add_device_option, device_note, make_plan, run_segmentation, split
from ml.imagesets.magnetic_tile import load_magnetic_tile
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
            results = run_segmentation(tiles, train, test, plan)
            for contrastive in plan.branches:
                cells[(split_seed, plan.model_seed, contrastive)] = {**results[contrastive], "images": len(test)}
                print(
                    f"split {split_seed}, model seed {plan.model_seed}, contrastive={contrastive}: "
                    f"IoU {results[contrastive]['iou']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
    assert plan is not None
    return report(args, plan, cells)


def report(args: argparse.Namespace, plan, cells: dict[tuple[int, int, bool], dict]) -> str:
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
    return "\n".join(lines)


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
    print(run_grid(parser.parse_args()))


if __name__ == "__main__":
    main()
