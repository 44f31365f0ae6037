"""The image-defect assessors on real defect images, beside their papers' figures (issue 7's benchmark).

One command for both parts; each part is its own module and can run alone:

- ``bench/image_neu.py``: NEU-DET few-shot classification (``selfcon_margin``, ``rmcsam``, the plain
  fine-tuned backbone), 10 and 20 training images per class;
- ``bench/image_tile.py``: magnetic-tile segmentation (``contrastive_seg`` with and without its
  contrastive branch) and unsupervised anomaly detection (``ssim_ae`` trained on defect-free tiles).

    .venv/bin/python bench/image_defects.py --threads 2   # both, figures into docs/benchmarks.md
    .venv/bin/python bench/image_defects.py --quick    # a smoke run in a few minutes, nothing written

The data lives in ``../shared/datasets`` beside the checkout (never in the repository).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import image_neu, image_tile
from bench.common import add_threads_option, provenance, write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run; docs/benchmarks.md is left alone")
    parser.add_argument("--only", choices=("neu", "tile"), help="run one part")
    add_threads_option(parser)
    parser.add_argument("--draws", type=int, help="NEU: random draws per k (default: the plan's)")
    args = parser.parse_args()
    parts = {"neu": image_neu, "tile": image_tile}
    for key, module in parts.items():
        if args.only and key != args.only:
            continue
        options = {"draws": args.draws} if key == "neu" else {}
        section = module.run(quick=args.quick, threads=args.threads, **options)
        print(section)
        if not args.quick:
            write_section(f"image-defects-{key}", f"{section.strip()}\n\n{provenance()}")


if __name__ == "__main__":
    main()
